"""Word and segment attribution to speakers, on hand-written turns with known answers."""
from __future__ import annotations

from typing import Any

from mp4totext.contracts import TranscriptResult
from workers.stages import diarize
from workers.stages.diarize import Turn, relabel, speaker_for, speaking_time


def assign_speakers(result: dict[str, Any], turns: list[Turn]) -> dict[str, Any]:
    """The stage on a stored (JSON) result, returning the stored form the assertions read."""
    return diarize.assign_speakers(TranscriptResult.from_json(result), turns).model_dump(mode="json")


def w(word: str, start: float, end: float) -> dict[str, Any]:
    return {"word": " " + word, "start": start, "end": end, "probability": 0.9}


def seg(words: list[dict[str, Any]], sid: int = 0) -> dict[str, Any]:
    return {"id": sid, "start": words[0]["start"], "end": words[-1]["end"],
            "text": "".join(x["word"] for x in words).strip(), "words": words}


A, B, C = "SPEAKER_00", "SPEAKER_01", "SPEAKER_02"


def test_word_takes_the_speaker_with_the_largest_overlap() -> None:
    turns = [Turn(0.0, 2.0, A), Turn(1.8, 4.0, B)]
    assert speaker_for(0.5, 1.0, turns) == A
    assert speaker_for(1.85, 2.5, turns) == B  # 0.15 s with A, 0.65 s with B (overlap region)
    assert speaker_for(1.5, 2.1, turns) == A  # 0.5 s vs 0.3 s


def test_overlapping_speech_sums_each_speakers_turns() -> None:
    # B has two short turns inside the word, A one longer: B's total wins.
    turns = [Turn(0.0, 1.0, A), Turn(1.0, 1.3, B), Turn(1.35, 1.7, B), Turn(1.6, 1.75, A)]
    assert speaker_for(0.9, 1.8, turns) == B  # A: 0.1 + 0.15, B: 0.3 + 0.35


def test_word_in_silence_takes_the_nearest_turn() -> None:
    turns = [Turn(0.0, 1.0, A), Turn(3.0, 4.0, B)]
    assert speaker_for(1.2, 1.4, turns) == A  # 0.2 s after A, 1.6 s before B
    assert speaker_for(2.6, 2.9, turns) == B
    assert speaker_for(5.0, 5.5, turns) == B  # after everything
    assert speaker_for(0.0, 0.1, []) is None


def test_ties_go_to_who_spoke_first() -> None:
    turns = [Turn(0.0, 1.0, A), Turn(1.0, 2.0, B)]
    assert speaker_for(0.5, 1.5, turns) == A
    assert speaker_for(1.9, 2.0, turns) == B


def test_segments_are_split_where_the_speaker_changes() -> None:
    words = [w("hello", 0.0, 0.4), w("there", 0.5, 0.9), w("hi", 1.2, 1.4), w("back", 1.5, 1.9),
             w("and", 2.1, 2.3), w("you", 2.4, 2.6)]
    # "and" straddles the change at 2.2 (0.1 s each side): tie -> first speaker A... but A
    # is first overall, so tie goes to A; "you" is B's.
    turns = [Turn(0.0, 1.0, A), Turn(1.1, 2.0, B), Turn(2.0, 2.2, A), Turn(2.2, 3.0, B)]
    result = {"text": "...", "segments": [seg(words)], "duration": 3.0}
    out = assign_speakers(result, turns)
    got = [(s["speaker"], s["text"], s["start"], s["end"]) for s in out["segments"]]
    assert got == [(A, "hello there", 0.0, 0.9), (B, "hi back", 1.2, 1.9), (A, "and", 2.1, 2.3),
                   (B, "you", 2.4, 2.6)]
    assert [s["id"] for s in out["segments"]] == [0, 1, 2, 3]
    assert [x["speaker"] for s in out["segments"] for x in s["words"]] == [A, A, B, B, A, B]
    assert out["speaker_count"] == 2
    unnamed = {"identified": False, "similarity": None}
    assert out["speakers"] == [{"label": A, "speaking_s": 1.2, "words": 3, **unnamed},
                               {"label": B, "speaking_s": 1.7, "words": 3, **unnamed}]
    assert result["segments"][0].get("speaker") is None  # the input is not modified


def test_word_straddling_a_change_goes_to_the_larger_side() -> None:
    turns = [Turn(0.0, 1.0, A), Turn(1.0, 2.0, B)]
    out = assign_speakers({"segments": [seg([w("long", 0.7, 1.6)])]}, turns)
    assert out["segments"][0]["speaker"] == B  # 0.3 s with A, 0.6 s with B


def test_segments_without_words_take_the_most_overlapping_speaker() -> None:
    segments = [{"id": 0, "start": 0.0, "end": 2.0, "text": "one", "words": []},
                {"id": 1, "start": 2.0, "end": 5.0, "text": "two", "words": []}]
    turns = [Turn(0.0, 2.5, A), Turn(2.5, 5.0, B)]
    out = assign_speakers({"segments": segments}, turns)
    assert [s["speaker"] for s in out["segments"]] == [A, B]
    assert [s["text"] for s in out["segments"]] == ["one", "two"]


def test_speaking_time_merges_a_speakers_overlapping_turns() -> None:
    turns = [Turn(0.0, 2.0, A), Turn(1.0, 3.0, A), Turn(5.0, 6.0, A), Turn(2.0, 2.5, B)]
    assert speaking_time(turns) == {A: 4.0, B: 0.5}


def test_relabel_numbers_speakers_in_order_of_first_speech() -> None:
    turns = [Turn(3.0, 4.0, "SPEAKER_00"), Turn(0.0, 1.0, "SPEAKER_01"), Turn(5.0, 6.0, "SPEAKER_02")]
    assert [(t.start, t.speaker) for t in relabel(turns)] == [(0.0, A), (3.0, B), (5.0, C)]


def test_no_turns_leaves_words_unattributed() -> None:
    out = assign_speakers({"segments": [seg([w("a", 0, 1)])]}, [])
    assert out["speaker_count"] == 0 and out["speakers"] == []
    assert out["segments"][0]["words"][0]["speaker"] is None


def test_known_speakers_match_one_to_one_above_the_threshold() -> None:
    import numpy as np

    from workers.stages.known_speakers import match

    voices = {"SPEAKER_00": np.array([1.0, 0.0, 0.0]), "SPEAKER_01": np.array([0.8, 0.6, 0.0]),
              "SPEAKER_02": np.array([0.0, 0.0, 1.0])}
    refs = {"Ayşe": np.array([0.9, 0.44, 0.0]), "Bob": np.array([1.0, 0.05, 0.0]), "Cem": np.array([0.0, 1.0, 0.0])}
    got = {label: (m.name, round(m.similarity, 2)) for label, m in match(voices, refs, 0.5).items()}
    # Bob is closest to both SPEAKER_00 and SPEAKER_01; the best one-to-one assignment gives
    # SPEAKER_01 to Ayşe; Cem is below the threshold for everyone; SPEAKER_02 matches nobody.
    assert got == {"SPEAKER_00": ("Bob", 1.0), "SPEAKER_01": ("Ayşe", 0.98)}
    assert match(voices, refs, 0.999) == {}
    assert match({}, refs, 0.5) == {} and match(voices, {}, 0.5) == {}
    assert match({"SPEAKER_00": np.zeros(3)}, refs, 0.5) == {}  # an unusable vector matches nothing


def test_known_names_replace_labels_and_the_rest_are_renumbered() -> None:
    from workers.stages.known_speakers import Match

    turns = [Turn(0, 2, "SPEAKER_00"), Turn(2, 4, "SPEAKER_01"), Turn(4, 6, "SPEAKER_02"), Turn(6, 7, "SPEAKER_00")]
    named = diarize.name_known(turns, {"SPEAKER_00": Match("Ayşe", 0.8)})
    assert [t.speaker for t in named] == ["Ayşe", "SPEAKER_00", "SPEAKER_01", "Ayşe"]
    assert diarize.name_known(turns, {}) == turns
