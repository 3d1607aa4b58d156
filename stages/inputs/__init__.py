"""What every configuration of one model shares: the corpora, the calibration windows,
and the dense activation capture."""
