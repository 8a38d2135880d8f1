"""Models of LatentSync 1.0: the audio-conditioned U-Net, its checkpoint loader and the Whisper features.

Nothing is re-exported (importing this package loads no torch); import from the modules:
``latentsync.models.unet3d`` (UNet3DConditionModel), ``latentsync.models.loading`` (load_unet),
``latentsync.models.whisper_features``, ``latentsync.models.vae``.
"""

__all__: list[str] = []
