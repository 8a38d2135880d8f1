"""Models of LatentSync 1.0: the audio-conditioned U-Net, its checkpoint loader and the Whisper features."""
