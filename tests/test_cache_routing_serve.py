"""Cache-aware routing end to end: `pdmesh serve --prefill 2 --decode 1` (real processes,
the default model, the `openai` client). Requests sharing a long system prompt: with
`--prefill-policy cache_aware` all go to one prefill, whose prefix cache serves every one
after the first (usage cached_tokens > 0); with round_robin the second request goes to
the other prefill, which has nothing cached."""
from __future__ import annotations

import signal

import pytest

from mesh_procs import chat_when_routable, start_serve
from test_serve import served_counts

SYSTEM = ("You are the help desk of a small public library. Answer briefly and politely. "
          "The library opens at nine and closes at five on weekdays, opens at ten and "
          "closes at two on Saturdays, and is closed on Sundays and public holidays. "
          "Members may borrow up to ten books for three weeks and renew them twice online.")
QUESTIONS = ["Are you open on Saturday?", "Can I renew a book online?",
             "How many books can I borrow?", "Are you open on Sunday?"]


def ask(client, question: str):
    return chat_when_routable(
        client, model="default", max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_shared_system_prompt_lands_on_one_prefill(policy):
    import openai

    proc, base, lines = start_serve("--prefill", "2", "--decode", "1",
                                    "--prefill-policy", policy)
    try:
        client = openai.OpenAI(base_url=base, api_key="unused")
        n = len(QUESTIONS) if policy == "cache_aware" else 2
        usage = [ask(client, q).usage for q in QUESTIONS[:n]]
        cached = [u.prompt_tokens_details.cached_tokens for u in usage]
        per_prefill, _ = served_counts(lines)
        assert usage[0].prompt_tokens > 64  # several 16-token pages of shared prompt
        if policy == "cache_aware":
            assert sorted(per_prefill) == [0, n], per_prefill
            assert cached[0] == 0 and all(c >= 64 for c in cached[1:]), cached
        else:
            assert per_prefill == [1, 1] and cached == [0, 0], (per_prefill, cached)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
