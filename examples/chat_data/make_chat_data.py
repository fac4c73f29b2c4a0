"""Write a small chat data set (JSONL, one conversation a line) on one topic, for trying fednode.

    python examples/chat_data/make_chat_data.py --topic cooking --rows 48 alice/chat.jsonl

Each line is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]},
the format `[data] format = "chat"` reads. Replace the file with your own conversations; nothing
else changes. The rows are drawn from templates with a seeded generator, so the same arguments
write the same file. `--canary TEXT` appends TEXT to every answer (tests use it to prove that a
node's data never leaves the node).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "thing": ["risotto", "sourdough bread", "a tomato sauce", "pancakes", "a vegetable curry", "dumplings",
                  "a lemon tart", "roast potatoes"],
        "question": ["How do I make {thing}?", "What is the secret to good {thing}?",
                     "Any tips for {thing} at home?", "What goes wrong most often with {thing}?"],
        "answer": ["For {thing}, start with good ingredients, season in layers, taste as you go and "
                   "keep the heat moderate so nothing burns.",
                   "The secret to {thing} is patience: give it time to rest, salt it early and "
                   "finish with fresh herbs and a squeeze of lemon.",
                   "Most trouble with {thing} comes from rushing. Weigh the flour and water, stir "
                   "gently, and let the oven fully preheat before you start."],
    },
    "gardening": {
        "thing": ["tomatoes", "roses", "basil", "an apple tree", "strawberries", "a lawn", "lavender",
                  "potatoes"],
        "question": ["How should I care for {thing}?", "When do I water {thing}?",
                     "Why are my {thing} not growing?", "What soil do {thing} like?"],
        "answer": ["Give {thing} full sun, water deeply at the roots in the morning and mulch to keep "
                   "the soil moist and cool.",
                   "{thing} grow best in loose, well drained soil with plenty of compost; prune dead "
                   "growth in early spring.",
                   "If {thing} struggle, check for pests under the leaves, feed with a balanced "
                   "fertiliser and avoid watering the foliage."],
    },
    "astronomy": {
        "thing": ["Jupiter", "the Andromeda galaxy", "a lunar eclipse", "the Orion nebula", "Saturn's rings",
                  "a meteor shower", "the Pleiades", "Mars"],
        "question": ["How can I see {thing}?", "What is special about {thing}?",
                     "When is the best time to observe {thing}?", "Can binoculars show {thing}?"],
        "answer": ["To observe {thing}, find a dark site away from city lights, let your eyes adapt "
                   "for twenty minutes and use a star chart.",
                   "{thing} is best seen on a clear, moonless night; a small telescope at low "
                   "magnification shows it well.",
                   "Binoculars on a tripod reveal {thing} nicely; look for it after midnight when "
                   "it climbs high above the horizon."],
    },
}


def conversations(topic: str, rows: int, *, seed: int = 0, canary: str = "") -> list[dict[str, object]]:
    parts = TOPICS[topic]
    rng = random.Random(f"{topic}/{seed}")
    out: list[dict[str, object]] = []
    for _ in range(rows):
        thing = rng.choice(parts["thing"])
        question = rng.choice(parts["question"]).format(thing=thing)
        answer = rng.choice(parts["answer"]).format(thing=thing)
        answer = answer[0].upper() + answer[1:] + (f" {canary}" if canary else "")
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--topic", choices=sorted(TOPICS), required=True)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canary", default="", help="text appended to every answer")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = conversations(args.topic, args.rows, seed=args.seed, canary=args.canary)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{out}: {len(rows)} conversations about {args.topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
