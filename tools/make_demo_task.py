"""Write the demo task shipped with peftkit: extracting an order from a customer message into JSON.

    python tools/make_demo_task.py      # rewrites src/peftkit/data/tasks/orders_{train,test}.jsonl

The held-out split uses names, cities, items and colours that never occur in training, and two phrasings
never seen in training: the model has to learn the format and copy the fields, not memorise them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "peftkit" / "data" / "tasks"
INSTRUCTION = (
    "Extract the order from this customer message as JSON with the keys name, item, quantity (a number), "
    "color and city."
)
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Lars",
         "Maya", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Samir", "Tess", "Umar", "Vera", "Wes", "Xiu",
         "Yara", "Zane", "Aiko", "Bea", "Cyrus", "Dmitri"]
TEST_NAMES = ["Elena", "Farid", "Greta", "Hugo", "Ines", "Jamal", "Kofi", "Lena", "Mateo", "Noor"]
CITIES = ["Paris", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Rome", "Warsaw", "Athens",
          "Zurich", "Boston", "Denver", "Seattle", "Austin", "Toronto", "Sydney", "Osaka", "Seoul"]
TEST_CITIES = ["Helsinki", "Porto", "Krakow", "Geneva", "Chicago", "Montreal"]
ITEMS = ["mug", "lamp", "chair", "notebook", "backpack", "umbrella", "teapot", "scarf", "pillow", "kettle",
         "wallet", "candle", "blanket", "bottle", "basket"]
TEST_ITEMS = ["clock", "vase", "towel", "jacket"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey"]
TEST_COLORS = ["pink", "brown", "silver"]

TEMPLATES = [
    "Hi, this is {name}. Please send {qty} {color} {items} to my address in {city}.",
    "Hello! I'd like to order {qty} {items} in {color}. Ship them to {city}. Thanks, {name}",
    "{name} here from {city} - can I get {qty} of your {color} {items}?",
    "Order request: {qty} x {color} {item}. Customer: {name}, {city}.",
    "Good morning, my name is {name} and I live in {city}. I want {qty} {color} {items}, please.",
    "Could you deliver {qty} {items} ({color}) to {city}? Regards, {name}.",
    "I'm {name}. {qty} {color} {items} for delivery in {city}, please!",
    "Please ship to {city}: {qty} {items}, colour {color}. Name on the order: {name}.",
]
TEST_TEMPLATES = TEMPLATES + [
    "Hey there, {name} writing from {city}. I need {qty} {color} {items} as soon as possible.",
    "Delivery to {city}, for {name}: {qty} {items} in {color}.",
]


def _example(rng: random.Random, names, cities, items, colors, templates) -> dict:
    qty = rng.randint(1, 12)
    item = rng.choice(items)
    fields = {"name": rng.choice(names), "item": item, "quantity": qty, "color": rng.choice(colors),
              "city": rng.choice(cities)}
    spelled = NUMBERS[qty - 1] if rng.random() < 0.5 else str(qty)
    text = rng.choice(templates).format(
        name=fields["name"], city=fields["city"], color=fields["color"], item=item,
        items=item if qty == 1 else item + "s", qty=spelled,
    )
    return {"instruction": INSTRUCTION, "input": text, "output": json.dumps(fields)}


def main() -> None:
    rng = random.Random(0)
    train = [_example(rng, NAMES, CITIES, ITEMS, COLORS, TEMPLATES) for _ in range(600)]
    test = [_example(rng, TEST_NAMES, TEST_CITIES, TEST_ITEMS, TEST_COLORS, TEST_TEMPLATES) for _ in range(100)]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("orders_train.jsonl", train), ("orders_test.jsonl", test)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {OUT / name}")


if __name__ == "__main__":
    main()
