"""Which transformers releases the GPT-2 integration supports.

The integration relies on transformers internals that change between releases: the attention and
mask interfaces (``AttentionInterface``, ``AttentionMaskInterface`` and the ``mask_function``
keyword the mask interface receives), extra keyword arguments of ``GPT2LMHeadModel.forward``
travelling into the attention function, and how ``generate`` builds ``position_ids``. These were
read and tested on 5.17, 5.24 and 5.25 (CI tests the lowest and the newest release); releases outside the
range are refused rather than risked.
"""
import importlib

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.17,<6")


def installed_transformers_version() -> str:
    # Looked up at call time: transformers' lazy module object can be replaced in sys.modules.
    return importlib.import_module("transformers").__version__


def check_transformers_version(version: str = None) -> None:
    """Raise RuntimeError when the installed transformers (or ``version``) is not supported."""
    installed = version if version is not None else installed_transformers_version()
    # Pre-releases (5.24.0.dev0) of a supported line are accepted: prereleases=True.
    if not SUPPORTED_TRANSFORMERS.contains(Version(installed), prereleases=True):
        raise RuntimeError(
            f"prefix_attn's GPT-2 integration supports transformers {SUPPORTED_TRANSFORMERS}, but transformers "
            f"{installed} is installed: install a supported release "
            f"(pip install 'transformers{SUPPORTED_TRANSFORMERS}')")
