"""Can the served model write the paraphrases an edit is trained on? (issue 22's "generate phrasings
with the served model itself at edit time")

    python -m bench.self_paraphrase --records 100 --out results/self_paraphrase.json

For the last N ZsRE records (never edited by the T <= 1000 evaluations) the model, memory off, is
asked in chat to rewrite the question: once greedily and twice sampled (temperature 0.9, fixed
seeds, so the same edit always gets the same phrasings). A proposal counts as a paraphrase when it
is a question (ends with "?"), is not the original question (case and punctuation ignored), and
keeps the question's subject. Reports how many proposals and how many records get one.
"""

from __future__ import annotations

import argparse
import json

from bench.common import table, write_json
from memoir_core import GenerationRequest, MemoirEngine, Message, SamplingParams, chat_prompt, load_model
from memoir_core.background import default_background_prompts
from memoir_core.eval import default_data_file
from memoir_core.free_eval import normalised
from memoir_core.presets import model_shape, recommended_config

INSTRUCTION = "Rewrite this question in different words, keeping its meaning. Reply with the rewritten question only.\n\n{}"
PROPOSALS = ((0.0, 0), (0.9, 1), (0.9, 2))  # (temperature, seed)


def is_paraphrase(proposal: str, question: str, subject: str) -> bool:
    text = proposal.strip()
    return (
        text.endswith("?")
        and normalised(text) != normalised(question)
        and normalised(subject) in normalised(text)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args()
    records = json.loads(default_data_file("zsre").read_text())[-args.records :]
    loaded = load_model(None, device="cpu", dtype="fp32")
    engine = MemoirEngine(loaded, recommended_config(model_shape(loaded.model)), context_templates=[])
    engine.add_chat_background(default_background_prompts())
    rows = []
    for record in records:
        prompt = chat_prompt(engine.tokenizer, [Message("user", INSTRUCTION.format(record["src"]))])
        ids, start = engine.encode(prompt)
        requests = [
            GenerationRequest(ids, start, SamplingParams(max_new_tokens=32, temperature=t, seed=s), False, format=prompt.format)
            for t, s in PROPOSALS
        ]
        proposals = [o.text for o in engine.generate(requests)]
        good = [is_paraphrase(p, record["src"], record["subject"]) for p in proposals]
        rows.append({"question": record["src"], "proposals": proposals, "paraphrase": good})
    proposals = sum(len(r["paraphrase"]) for r in rows)
    good = sum(sum(r["paraphrase"]) for r in rows)
    with_one = sum(any(r["paraphrase"]) for r in rows)
    summary = {
        "records": len(rows),
        "proposals": proposals,
        "paraphrases": good,
        "paraphrase_rate": good / proposals,
        "records_with_a_paraphrase": with_one / len(rows),
        "examples": rows[:10],
    }
    print(
        table(
            ["records", "proposals", "paraphrases", "rate", "records with one"],
            [[len(rows), proposals, good, good / proposals, with_one / len(rows)]],
        )
    )
    write_json(args.out, {"benchmark": "self_paraphrase", **summary, "rows": rows})


if __name__ == "__main__":
    main()
