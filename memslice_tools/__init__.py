"""memslice's tools, apart from the runtime (which never imports them): the side-by-side benchmark
(:mod:`.run`, ``python -m lib_memslice bench``, ``make bench``), the CUDA checks (:mod:`.gpu_check`), the activation
fitting (:mod:`.fit_activations`), the live-tensor tracker (:mod:`.memtrack`), the profiler replay (:mod:`.inop`)
and the CPU allocator's share (:mod:`.overhead`). They need matplotlib for the plot and, optionally, diffusers.
"""
