"""Runs last: no secret that existed during the suite (the generated database passwords, the
admin API key, the pepper) appears in any output the suite captured from the fab CLI."""


def test_no_secret_value_in_any_captured_output(captured_outputs, known_secrets):
    assert captured_outputs, "the suite captured no fab output: this test would prove nothing"
    assert any(len(s) >= 16 for s in known_secrets), "no secrets were recorded"
    leaks = [(i, s[:4] + "...") for i, out in enumerate(captured_outputs)
             for s in known_secrets if len(s) >= 8 and s in out]
    assert not leaks, f"secret values found in captured outputs: {leaks}"
