import pytest

from tests.conftest import nbdcrypt_luks1


@pytest.fixture
def image(tmp_path, key_file):
    """A 64 MiB (sparse) LUKS1 image made by ``nbdcrypt format``, cheap to unlock;
    test files that want a qemu-made image override it."""
    return nbdcrypt_luks1(tmp_path / "img", key_file, "64M")
