"""On PYTHONPATH, makes this Python behave as if TensorFlow were not installed: importing it
raises ImportError and nothing named tensorflow enters sys.modules (Keras checks there)."""

import sys


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"No module named {name!r} (hidden by tests/without_tensorflow)")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
