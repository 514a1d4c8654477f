"""The test session refuses, with the reason, release pairs under which Triton's interpreter cannot run."""
from tests.conftest import interpreter_release_conflict


def test_triton_3_6_with_numpy_2_4_is_refused_with_the_fix():
    message = interpreter_release_conflict("3.6.0", "2.4.6")
    assert message is not None and "numpy<2.4" in message and "Triton >= 3.7" in message


def test_working_pairs_pass():
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.6.0", "1.26.4"), ("3.7.0", "2.4.6"),
                                          ("3.9.0", "2.4.0rc1"), ("4.0.0", "3.0.0")):
        assert interpreter_release_conflict(triton_version, numpy_version) is None, (triton_version, numpy_version)
