"""``keygen --force`` replaces a key pair safely: the new private key is 0600 whatever was
there, and a symlink planted at the key path is replaced, never written through."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pvhost import signing


@pytest.mark.security
def test_force_makes_a_world_readable_key_file_private(tmp_path: Path) -> None:
    key = tmp_path / signing.PRIVATE_NAME
    key.write_text("an old key, left world-readable\n")
    key.chmod(0o644)
    assert signing.main(["keygen", str(tmp_path), "--force"]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.security
@pytest.mark.parametrize("name", [signing.PRIVATE_NAME, signing.PUBLIC_NAME])
def test_force_replaces_a_symlink_instead_of_writing_its_target(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_text("not yours\n")
    victim.chmod(0o644)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / name).symlink_to(victim)
    private, public = signing.generate_keypair(keys, overwrite=True)
    assert victim.read_text() == "not yours\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not private.is_symlink() and not public.is_symlink()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(p.name for p in keys.iterdir()) == [signing.PRIVATE_NAME, signing.PUBLIC_NAME]


@pytest.mark.security
def test_a_dangling_symlink_counts_as_an_existing_key(tmp_path: Path) -> None:
    """Without --force nothing is replaced, not even a link to a file that does not exist yet
    (opening it with O_CREAT would create the link's target)."""
    target = tmp_path / "created-through-the-link"
    (tmp_path / signing.PRIVATE_NAME).symlink_to(target)
    with pytest.raises(signing.SigningError, match="refusing to overwrite"):
        signing.generate_keypair(tmp_path)
    assert not target.exists()


def test_the_new_pair_is_usable(tmp_path: Path) -> None:
    private, public = signing.generate_keypair(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert len(signing.sign(b"payload", private)) == 64
