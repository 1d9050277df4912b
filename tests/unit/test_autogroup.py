"""Reading the scheduler's autogroup: the kernel's formats, including the empty text of its
default group (a CI runner started by a container's init lives there)."""

from __future__ import annotations

import pytest

from extpv.autogroup import autogroup_nice, parse_autogroup


def test_a_session_group_line_gives_its_nice_value() -> None:
    assert parse_autogroup("/autogroup-123 nice -7\n") == -7


def test_the_default_groups_empty_text_means_no_group_value() -> None:
    assert parse_autogroup("") is None
    assert parse_autogroup("\n") is None


@pytest.mark.parametrize("text", ["nice 0", "/autogroup-1 weight 0", "/autogroup-1 nice x"])
def test_an_unknown_format_is_an_error_not_a_guess(text: str) -> None:
    with pytest.raises(ValueError):
        parse_autogroup(text)


def test_a_kernel_thread_is_in_the_default_group_with_no_value_to_weigh() -> None:
    # kthreadd (PID 2) never gets an autogroup: the kernel's real empty text, read back.
    assert autogroup_nice(2) is None
