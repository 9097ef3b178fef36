"""Engine: training, evaluation, prediction, checkpoints (each a typed function; cli.py only parses)."""
