"""Inference pipelines: glue between the models and the scheduler (no model or sampling logic of their own)."""

from latentsync.pipelines.lipsync_pipeline import (
    LipsyncChunk,
    LipsyncOutput,
    LipsyncPipeline,
    initial_noise,
    load_scheduler,
)

__all__ = ["LipsyncChunk", "LipsyncOutput", "LipsyncPipeline", "initial_noise", "load_scheduler"]
