"""Fake of modules/call_queue.py: the queue lock generation holds."""

import threading

queue_lock = threading.Lock()
