"""Benchmarks (`make bench`). Importing the package quiets TensorFlow's native start-up
lines ("Could not find cuda drivers", absl's notice) in every bench process, spawned ones
included, as the stage commands do; TF_CPP_MIN_LOG_LEVEL=0 brings them back."""

from skinlesion import logs

logs.quiet_tensorflow(debug=False)
logs.import_tensorflow()
