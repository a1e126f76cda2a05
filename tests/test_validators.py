"""Every name and id pattern matches the whole string: a trailing newline is not part of a valid name.

Python's ``$`` also matches before a final newline, so ``^[a-z]+$`` accepted ``"digits\\n"``; the
patterns end in ``\\Z``."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from agent.archive import check_member_name
from agent.errors import ArchiveError, EdgeshipError, SignatureError
from agent.manifest import check_name, check_semver
from agent.signing import TransferSignature
from packager.repo_publish import check_groups

GOOD_SIG = {"keyid": "a" * 64, "sig": "MEUCIQCw3r8c3Y2tWwQv6m7v0oVb1a3Z8yYw8G8vS9f0H6o3JwIgQ0k8m2o1J7m8hY1y0b5z6T9q1x4w2p3v8n7m6l5k4j0="}


@pytest.mark.parametrize("check, good", [
    (check_name, "digits"),
    (check_semver, "1.0.0"),
    (check_member_name, "model.onnx"),
    (lambda g: check_groups([g]), "canary"),
])
def test_a_trailing_newline_is_refused(check: Callable[[str], Any], good: str) -> None:
    check(good)
    with pytest.raises((EdgeshipError, ArchiveError)):
        check(good + "\n")


def test_a_key_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(SignatureError, match="key id"):
        TransferSignature.from_json({**GOOD_SIG, "keyid": "a" * 64 + "\n"})
