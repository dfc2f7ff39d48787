"""Per-file checksums catch truncation, a flipped byte and a missing file, and name the file."""
import pytest

from train.checkpoint.checksums import CHECKSUM_FILE, ChecksumMismatch, verify_checksums, write_checksums


@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
    (tmp_path / "COMPLETE").write_text("ok\n")
    write_checksums(tmp_path, skip=("COMPLETE",))
    return tmp_path


def test_intact_checkpoint_verifies_and_one_without_checksums_is_not_verified(ckpt, tmp_path_factory):
    assert verify_checksums(ckpt) is True
    assert verify_checksums(tmp_path_factory.mktemp("old")) is False
    assert "COMPLETE" not in (ckpt / CHECKSUM_FILE).read_text()


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:100]), r"a.bin has 100 bytes, 10240 were saved"),
    (lambda d: (d / "a.bin").write_bytes(b"\x01" + (d / "a.bin").read_bytes()[1:]), r"a.bin does not match the SHA-256"),
    (lambda d: (d / "sub" / "b.json").unlink(), r"sub/b.json is missing"),
])
def test_damage_is_named(ckpt, damage, match):
    damage(ckpt)
    with pytest.raises(ChecksumMismatch, match=match):
        verify_checksums(ckpt)


def test_only_checks_the_named_files(ckpt):
    (ckpt / "sub" / "b.json").unlink()
    assert verify_checksums(ckpt, only=["a.bin"]) is True
