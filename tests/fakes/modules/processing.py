"""Fake of the parts of modules/processing.py a generation passes through: override_settings, AlwaysVisible
script hooks and infotext assembly from ``extra_generation_params`` (callables evaluated per image)."""

from __future__ import annotations

from modules import shared


class StableDiffusionProcessing:
    def __init__(self, width=512, height=512, batch_size=1, override_settings=None, scripts=()):
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = True
        self.extra_generation_params = {}
        self.alwayson_scripts = list(scripts)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img with Hires. fix: the webui computes ``hr_upscale_to_x/y`` (the size the picture is upscaled to) and
    ``truncate_x/y`` (latent columns and rows cropped from it when both target sides are given) before sampling, and
    sets ``is_hr_pass`` while the hires UNet pass runs (the final VAE decode runs after it is reset). Tests pass the
    computed fields as the webui would have set them."""

    def __init__(self, enable_hr=False, hr_upscaler=None, hr_upscale_to_x=0, hr_upscale_to_y=0, hr_resize_x=0,
                 hr_resize_y=0, truncate_x=0, truncate_y=0, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_upscaler = hr_upscaler
        self.hr_upscale_to_x = hr_upscale_to_x
        self.hr_upscale_to_y = hr_upscale_to_y
        self.hr_resize_x = hr_resize_x
        self.hr_resize_y = hr_resize_y
        self.truncate_x = truncate_x
        self.truncate_y = truncate_y
        self.is_hr_pass = False


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = list(init_images or [])


class Processed:
    def __init__(self, p, infotexts):
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.extra_generation_params = p.extra_generation_params


def create_infotext(p, index=0):
    generation_params = {"Steps": 1, "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    for key, value in list(generation_params.items()):
        if callable(value):
            generation_params[key] = value(**locals())
    text = ", ".join(k if k == v else f"{k}: {v}" for k, v in generation_params.items() if v is not None)
    return f"prompt\n{text}"


def process_images(p, sample):
    """Apply overrides without onchange, run the script hooks around ``sample(p)``, restore the options."""
    stored_opts = {
        k: shared.opts.data[k] if k in shared.opts.data else shared.opts.get_default(k)
        for k in p.override_settings.keys()
        if k in shared.opts.data
    }
    try:
        for k, v in p.override_settings.items():
            shared.opts.set(k, v, is_api=True, run_callbacks=False)
        return process_images_inner(p, sample)  # through the module's global, as the webui calls it
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(shared.opts, k, v)


def process_images_inner(p, sample):
    """The script hooks around ``sample(p)``; postprocess runs only when sampling returns (not on an error)."""
    for script in p.alwayson_scripts:
        script.process(p)
    sample(p)
    infotexts = [create_infotext(p, i) for i in range(p.batch_size)]
    processed = Processed(p, infotexts)
    for script in p.alwayson_scripts:
        script.postprocess(p, processed)
    return processed
