"""Random strings and numbers to every option of `run`, `bench` and `atari` (with --check, which
validates everything and stops): each call either passes or exits 2 with one `error:` line; nothing
else escapes, no traceback."""
import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wmbench.cli import build_parser, main

SUB = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
SKIP = {"-h", "--help", "--check"}


def _options(cmd):
    return sorted(a.option_strings[-1] for a in SUB.choices[cmd]._actions
                  if a.option_strings and not SKIP & set(a.option_strings))


values = st.one_of(
    st.text(max_size=12),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "-1", "1e309", "nan", "XS", "cpu", "cuda", "auto", "gru,gru", ",", "a=b",
                     "wm_lr=-1", "gamma=0", "d_model=3.5", "enc_filters=[]", "episode_length=0"]),
)


@pytest.mark.parametrize("cmd", ["run", "bench", "atari"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_option_takes_any_value_without_a_traceback(cmd, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = data.draw(st.lists(st.sampled_from(_options(cmd)), min_size=1, max_size=3))
    argv = [cmd] + (["--game", "Krull"] if cmd == "atari" and "--game" not in opts else [])
    for o in opts:
        argv += [o, data.draw(values)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv + ["--check"])
        except SystemExit as e:     # argparse: unknown value types, extra arguments
            rc = e.code
    text = err.getvalue()
    assert "Traceback" not in text
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        errors = [ln for ln in text.strip().splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], (argv, text)
