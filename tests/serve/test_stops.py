"""Stop strings over text that arrives in pieces: a stop split across pieces is found, text that
may begin a stop is held back, and released when it turns out not to be one."""

from __future__ import annotations

from arx.serve.stops import StopText


def feed(stops, pieces):
    s, out = StopText(stops), []
    for p in pieces:
        text, hit = s.push(p)
        out.append(text)
        if hit:
            return out, True
    out.append(s.flush())
    return out, False


def test_stop_split_across_pieces_is_cut_before_it():
    assert feed(("END",), ["ab", "cE", "N", "Dxyz"]) == (["ab", "c", "", ""], True)


def test_partial_stop_is_held_then_released():
    out, hit = feed(("END",), ["aE", "Nb", "c"])
    assert not hit and out == ["a", "ENb", "c", ""]
    assert feed(("END",), ["xE", "N"]) == (["x", "", "EN"], False)  # flushed at the end


def test_earliest_of_several_stops_wins_and_empty_stops_are_ignored():
    assert feed(("", "cd", "b"), ["abcd"]) == (["a"], True)
    assert feed(("",), ["abc"]) == (["abc", ""], False)


def test_overlapping_prefixes_hold_the_longest():
    s = StopText(("aab",))
    assert s.push("xaa") == ("x", False)
    assert s.push("a") == ("a", False)  # "aaa": only the last "aa" can still begin "aab"
    assert s.push("b") == ("", True)
