"""Schemathesis hooks for ttrl-serve: bodies for the adapter import, which takes a zip.

Loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks from this folder. Imports get random
bytes, and zips of random files under the names an adapter import looks for.
"""
import io
import zipfile

import schemathesis
from hypothesis import strategies as st


def _zip(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files:
            archive.writestr(name, data)
    return buffer.getvalue()


_names = st.sampled_from(["adapter_model.safetensors", "adapter_config.json", "README.md"])
_zips = st.lists(st.tuples(_names, st.binary(max_size=512)), max_size=3).map(_zip)
schemathesis.openapi.media_type("application/zip", st.one_of(st.binary(max_size=2048), _zips))
