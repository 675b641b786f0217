"""skinlesion: retraining pipeline for a 7-class HAM10000 skin-lesion classifier."""

__version__ = "0.1.0"
