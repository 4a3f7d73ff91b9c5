"""Seeded synthetic tool-calling conversations.

The quickstart dataset (data/examples/tool-calling.jsonl) and the benchmark and scale tests
come from here, so they can be regenerated exactly:

    python -m data synthetic --n 400 --seed 0 --out data/examples/tool-calling.jsonl

Conversations are OpenAI messages with `tools`, reasoning in `reasoning_content`, single and
parallel tool calls, tool results, final answers, small talk without tools, and multi-turn
follow-ups. With `long_tail=True`, user turns carry pasted context whose length follows a
log-normal law, as real chat data does (most short, a few very long).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = {
    "Paris": ("Europe/Paris", "EUR"), "Berlin": ("Europe/Berlin", "EUR"), "Tokyo": ("Asia/Tokyo", "JPY"),
    "London": ("Europe/London", "GBP"), "Madrid": ("Europe/Madrid", "EUR"), "Rome": ("Europe/Rome", "EUR"),
    "Lisbon": ("Europe/Lisbon", "EUR"), "Oslo": ("Europe/Oslo", "NOK"), "Seoul": ("Asia/Seoul", "KRW"),
    "Sydney": ("Australia/Sydney", "AUD"), "Toronto": ("America/Toronto", "CAD"),
    "Chicago": ("America/Chicago", "USD"), "Denver": ("America/Denver", "USD"),
    "Mumbai": ("Asia/Kolkata", "INR"), "Cairo": ("Africa/Cairo", "EGP"), "Lima": ("America/Lima", "PEN"),
    "Zurich": ("Europe/Zurich", "CHF"), "Vienna": ("Europe/Vienna", "EUR"), "Dublin": ("Europe/Dublin", "EUR"),
    "Nairobi": ("Africa/Nairobi", "KES"), "Mexico City": ("America/Mexico_City", "MXN"),
    "São Paulo": ("America/Sao_Paulo", "BRL"), "Kraków": ("Europe/Warsaw", "PLN"),
}
TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "ORCL", "INTC", "AMD", "IBM", "SAP"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NOK", "INR", "BRL"]
CONDITIONS = ["sunny", "cloudy", "raining", "snowing", "windy", "foggy", "clear"]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money between two currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "description": "ISO code, e.g. USD"},
            "to_currency": {"type": "string", "description": "ISO code, e.g. EUR"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
    {"type": "function", "function": {
        "name": "get_stock_price",
        "description": "Latest price of a stock.",
        "parameters": {"type": "object", "properties": {
            "ticker": {"type": "string", "description": "Ticker symbol, e.g. AAPL"}},
            "required": ["ticker"]}}},
    {"type": "function", "function": {
        "name": "get_local_time",
        "description": "Current local time in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}},
            "required": ["city"]}}},
]

SMALL_TALK = [
    ("Hi! Who are you?", "The user greets me and asks who I am. No tool is needed.",
     "Hello! I am a small assistant that can look up weather, currency rates, stock prices and local times."),
    ("Thanks, that's all.", "The user is done. No tool is needed.", "You're welcome! Have a great day."),
    ("What can you do?", "The user asks about my abilities. No tool is needed.",
     "I can check the weather, convert currencies, look up stock prices and tell the local time in a city."),
    ("Tell me a fun fact.", "The user wants a fun fact. I can answer directly.",
     "Octopuses have three hearts and blue blood."),
    ("How many days are in a leap year?", "This is general knowledge. No tool is needed.",
     "A leap year has 366 days."),
]

FILLER = (
    "Here is some context from my notes. The project started in spring and the team grew from two "
    "to nine people. We moved the build to a new machine, rewrote the release checklist and spent a "
    "week on flaky tests. Travel is planned for the autumn, with stops in several cities. "
)


def _weather(rng: random.Random, city: str, unit: str | None) -> tuple[dict, str, str]:
    temp = rng.randint(-5, 35)
    cond = rng.choice(CONDITIONS)
    args = {"city": city} if unit is None else {"city": city, "unit": unit}
    shown = f"{temp}°C" if unit != "fahrenheit" else f"{round(temp * 9 / 5 + 32)}°F"
    result = {"city": city, "temperature": shown, "condition": cond}
    return args, json.dumps(result, ensure_ascii=False), f"It is {shown} and {cond} in {city}."


def _tool_turn(rng: random.Random) -> tuple[str, list[tuple[str, dict, str, str]], str]:
    """A user request, the calls it needs (name, args, result, answer sentence), reasoning."""
    kind = rng.choice(["weather", "weather", "weather2", "currency", "stock", "time"])
    if kind == "weather":
        city = rng.choice(list(CITIES))
        unit = rng.choice([None, None, "celsius", "fahrenheit"])
        asks = [f"What's the weather in {city}?", f"How is the weather in {city} right now?",
                f"Is it cold in {city} today?"]
        if unit == "fahrenheit":
            asks = [f"What's the weather in {city} in fahrenheit?"]
        args, res, ans = _weather(rng, city, unit)
        return rng.choice(asks), [("get_weather", args, res, ans)], (
            f"The user wants the weather in {city}. I will call get_weather for {city}.")
    if kind == "weather2":
        a, b = rng.sample(list(CITIES), 2)
        calls = []
        for city in (a, b):
            args, res, ans = _weather(rng, city, None)
            calls.append(("get_weather", args, res, ans))
        return f"Compare the weather in {a} and {b}.", calls, (
            f"The user wants the weather in two cities. I will call get_weather for {a} and for {b}.")
    if kind == "currency":
        amount = rng.choice([5, 10, 20, 50, 100, 250, 1000, 12.5])
        src, dst = rng.sample(CURRENCIES, 2)
        rate = round(rng.uniform(0.2, 3.0), 4)
        args = {"amount": amount, "from_currency": src, "to_currency": dst}
        res = json.dumps({"amount": round(amount * rate, 2), "currency": dst})
        return (rng.choice([f"Convert {amount} {src} to {dst}.", f"How much is {amount} {src} in {dst}?"]),
                [("convert_currency", args, res, f"{amount} {src} is {round(amount * rate, 2)} {dst}.")],
                f"The user wants to convert {amount} {src} to {dst}. I will call convert_currency.")
    if kind == "stock":
        ticker = rng.choice(TICKERS)
        price = round(rng.uniform(20, 900), 2)
        res = json.dumps({"ticker": ticker, "price": price, "currency": "USD"})
        return (rng.choice([f"What is {ticker} trading at?", f"Price of {ticker} stock?"]),
                [("get_stock_price", {"ticker": ticker}, res, f"{ticker} is trading at {price} USD.")],
                f"The user asks for the price of {ticker}. I will call get_stock_price.")
    city = rng.choice(list(CITIES))
    hour, minute = rng.randint(0, 23), rng.randint(0, 59)
    res = json.dumps({"city": city, "time": f"{hour:02d}:{minute:02d}", "timezone": CITIES[city][0]})
    return (rng.choice([f"What time is it in {city}?", f"Local time in {city}?"]),
            [("get_local_time", {"city": city}, res, f"It is {hour:02d}:{minute:02d} in {city}.")],
            f"The user wants the local time in {city}. I will call get_local_time.")


def _filler(rng: random.Random, long_tail: bool) -> str:
    if not long_tail:
        return ""
    # log-normal repeat count: median ~1 paragraph, a few with dozens
    repeats = int(rng.lognormvariate(0.0, 1.2))
    return (FILLER * repeats).strip() + "\n\n" if repeats else ""


def _exchange(rng: random.Random, counter: list[int], long_tail: bool) -> list[dict]:
    if rng.random() < 0.15:
        user, reasoning, answer = rng.choice(SMALL_TALK)
        return [{"role": "user", "content": _filler(rng, long_tail) + user},
                {"role": "assistant", "reasoning_content": reasoning, "content": answer}]
    user, calls, reasoning = _tool_turn(rng)
    ids = []
    for _ in calls:
        counter[0] += 1
        ids.append(f"call_{counter[0]}")
    msgs = [
        {"role": "user", "content": _filler(rng, long_tail) + user},
        {"role": "assistant", "reasoning_content": reasoning, "content": "",
         "tool_calls": [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
                        for i, (n, a, _, _) in zip(ids, calls)]},
    ]
    msgs += [{"role": "tool", "tool_call_id": i, "name": n, "content": r} for i, (n, _, r, _) in zip(ids, calls)]
    msgs.append({"role": "assistant", "reasoning_content": "The tool returned the answer.",
                 "content": " ".join(ans for _, _, _, ans in calls)})
    return msgs


def generate_conversations(n: int, seed: int = 0, long_tail: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        counter = [0]
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        msgs += _exchange(rng, counter, long_tail)
        if rng.random() < 0.2:  # a follow-up question in the same conversation
            msgs += _exchange(rng, counter, long_tail)
        rows.append({"messages": msgs, "tools": TOOLS})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removed if writing or the rename failed


# --------------------------------------------------------------------------- toy tasks
# Small learnable tasks with a held-out split, for tests that must show a technique learned
# the right thing (a falling training loss alone also passes with a wrong loss mask).


def generate_preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """DPO pairs: the chosen answer calls the tool the question needs, the rejected one calls
    another tool with the same reasoning. Held-out accuracy = how often the policy prefers the
    chosen answer."""
    rng = random.Random(seed)
    names = [t["function"]["name"] for t in TOOLS]
    rows = []
    for k in range(n):
        user, calls, reasoning = _tool_turn(rng)
        name, args, _, _ = calls[0]
        wrong = rng.choice([x for x in names if x != name])
        wrong_args = {"city": "Paris"} if wrong in ("get_weather", "get_local_time") else (
            {"ticker": "IBM"} if wrong == "get_stock_price" else {"amount": 1, "from_currency": "USD", "to_currency": "EUR"})

        def answer(fn, fn_args):
            return {"role": "assistant", "reasoning_content": reasoning, "content": "",
                    "tool_calls": [{"id": f"call_{k}", "type": "function",
                                    "function": {"name": fn, "arguments": json.dumps(fn_args)}}]}

        rows.append({"prompt": [{"role": "user", "content": user}], "chosen": [answer(name, args)],
                     "rejected": [answer(wrong, wrong_args)], "tools": TOOLS})
    return rows


CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Norway", "Oslo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon")]


def generate_documents(n: int, seed: int = 0) -> list[dict]:
    """Plain-text documents for continued pretraining: short notes that state which city is
    the capital of which country, in a few phrasings. Held-out accuracy = predicting the
    capital after "The capital of COUNTRY is"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        facts = rng.sample(CAPITALS, 3)
        lines = [rng.choice(["The capital of {c} is {k}.", "{k} is the capital of {c}.",
                             "In {c}, the capital is {k}."]).format(c=c, k=k) for c, k in facts]
        rows.append({"text": " ".join(lines)})
    return rows


SHORT_TOOLS = [{"type": "function", "function": {"name": t["function"]["name"]}} for t in TOOLS]


def generate_tool_choice(n: int, seed: int = 0) -> list[dict]:
    """SFT conversations of one question and one tool call, with the tools listed by name only
    (short prompts, so a few dozen steps on CPU suffice). Held-out accuracy = how often the
    model calls the tool the question needs."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        user, calls, reasoning = _tool_turn(rng)
        name, args, _, _ = calls[0]
        rows.append({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "reasoning_content": reasoning, "content": "",
             "tool_calls": [{"id": f"call_{k}", "type": "function",
                             "function": {"name": name, "arguments": json.dumps(args)}}]}],
            "tools": SHORT_TOOLS})
    return rows


def generate_tool_prompts(n: int, seed: int = 0) -> list[dict]:
    """GRPO's toy task: one question and the one tool it needs, called with empty arguments and
    no reasoning, the tools listed by name only. Completions are about 20 tokens, so rollouts on
    CPU are cheap; the tool_call reward is 1 exactly when the model picks the right tool."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        user, calls, _ = _tool_turn(rng)
        rows.append({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": f"call_{k}", "type": "function",
                             "function": {"name": calls[0][0], "arguments": "{}"}}]}],
            "tools": SHORT_TOOLS})
    return rows
