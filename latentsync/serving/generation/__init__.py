"""Generation: speech becomes faces.

Tasks and their states, the scheduler (admission, deadlines), programs (reorder and jitter
buffers), processors, utterances, text to speech and the engine worker pool.
"""
