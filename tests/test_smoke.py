
import diffdensity as dd


def test_public_names_resolve():
    for name in dd.__all__:
        assert getattr(dd, name) is not None, name
