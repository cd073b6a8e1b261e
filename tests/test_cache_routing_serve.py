"""Cache-aware routing end to end: `pdmesh serve --prefill 2 --decode 1` (real processes,
the default model, the `openai` client). Requests sharing a long system prompt: with
`--prefill-policy cache_aware` all go to one prefill, whose prefix cache serves every one
after the first (usage cached_tokens > 0). (Round robin, the default, alternates the two
prefills, so the second request finds nothing cached: test_serve's per-prefill counts;
test_cache_routing.py has both policies without processes.)"""
from __future__ import annotations

import signal


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


def test_shared_system_prompt_lands_on_one_prefill():
    import openai

    proc, base, lines = start_serve("--prefill", "2", "--decode", "1",
                                    "--prefill-policy", "cache_aware")
    try:
        client = openai.OpenAI(base_url=base, api_key="unused")
        usage = [ask(client, q).usage for q in QUESTIONS]
        cached = [u.prompt_tokens_details.cached_tokens for u in usage]
        per_prefill, _ = served_counts(lines)
        assert usage[0].prompt_tokens > 64  # several 16-token pages of shared prompt
        assert sorted(per_prefill) == [0, len(QUESTIONS)], per_prefill
        assert cached[0] == 0 and all(c >= 64 for c in cached[1:]), cached
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
