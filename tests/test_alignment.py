"""Token alignment between teacher and student vocabularies (fake tokenizers, milliseconds)."""

from gen_ssd_ray.core.types import Candidate, ScoreRequest
from gen_ssd_ray.engines.alignment import Aligner


class CharTok:
    """Student tokenizer: one token per character; 'ab' merges into one token (a boundary straddler)."""

    eos_token_id = 0

    def get_vocab(self):
        return {"char": 1}

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offs, i = [], [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                offs.append((i, i + 2))
                i += 2
            else:
                ids.append(ord(text[i]))
                offs.append((i, i + 1))
                i += 1
        return {"input_ids": ids, "offset_mapping": offs}


class OtherTok:
    def get_vocab(self):
        return {"other": 1}


def req(prefix_text, *cands):
    return ScoreRequest("k", "g", (5, 6), (99,), prefix_text, tuple(Candidate((1,), t, f) for t, f in cands))


def test_same_vocabulary_uses_teacher_ids():
    tok = CharTok()
    rows = Aligner(tok, tok).rows(req("x", ("y", "length")))
    assert rows.context == (5, 6, 99) and rows.targets == ((1,),) and rows.extras == ((),)


def test_different_vocabulary_retokenizes_by_character_offsets():
    rows = Aligner(CharTok(), OtherTok()).rows(req("xya", ("b!", "length"), ("zz", "stop")))
    # candidate 0: "xya"+"b!" -> x y [ab] ! : the straddling 'ab' token belongs to the candidate
    # candidate 1: "xya"+"zz" -> x y a z z, then the student's EOS since the teacher stopped
    assert rows.context == (5, 6, ord("x"), ord("y"))
    assert rows.extras == ((), (ord("a"),))
    assert rows.targets == ((1000, ord("!")), (ord("z"), ord("z"), 0))
