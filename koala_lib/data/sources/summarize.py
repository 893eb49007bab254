"""summarize_from_feedback (`openai/summarize_from_feedback`, config `comparisons`).

`{"info": {"id", "post", "title", "subreddit", "article", "site"}, "summaries": [{"text"}, {"text"}], "choice": 0|1, ...}`.
The user turn is an instruction plus the post. Stated rule for CNN/DM rows, which carry `article` and a null
`post`: the instruction asks for a news summary and the article stands in for the post. A row with neither
is `empty`; a null field is left out, never written as the string "None".
"""

from __future__ import annotations

from ..schema import Record, Reject, Turn, require

SCHEMA = '{"info": {"post": str|null, "title": str, "subreddit": str, "article": str|null}, "summaries": [{"text": str}, {"text": str}], "choice": 0|1} per line'


def render_prompt(info: dict) -> str:
    """The instruction and the text to summarize; fields that are null or empty are omitted."""
    def field(name: str) -> str:
        value = info.get(name)
        return value.strip() if isinstance(value, str) else ""

    post, article, title = field("post"), field("article"), field("title")
    if post:
        head = ["Summarize the following Reddit post."]
        if field("subreddit"):
            head.append(f"SUBREDDIT: r/{field('subreddit')}")
        if title:
            head.append(f"TITLE: {title}")
        return "\n".join(head) + f"\nPOST: {post}"
    if article:
        head = ["Summarize the following news article."] + ([f"TITLE: {title}"] if title else [])
        return "\n".join(head) + f"\nARTICLE: {article}"
    raise Reject("empty", "neither post nor article")


def parse(row, key: str, src, data) -> list[Record]:
    info = require(row, "info", dict)
    summaries = require(row, "summaries", list)
    choice = require(row, "choice", int)
    if len(summaries) != 2 or choice not in (0, 1):
        raise Reject("malformed", f"expected 2 summaries and choice 0 or 1, got {len(summaries)} and {choice}")
    texts = [require(s, "text", str, f"summaries[{i}]").strip() for i, s in enumerate(summaries)]
    prompt = render_prompt(info)
    if not all(texts):
        raise Reject("empty", "an empty summary")
    upstream_id = info.get("id") if isinstance(info.get("id"), str) else key
    meta = {"upstream_id": upstream_id, "kind": "reddit" if info.get("post") else "news"}
    out = []
    for idx, pref in ((choice, "positive"), (1 - choice, "negative")):
        if pref == "negative" and data.pairs != "positive_negative":
            continue
        policy = summaries[idx].get("policy")
        out.append(Record(f"summarize:{key}:{pref[:3]}", "summarize", (Turn("user", prompt), Turn("assistant", texts[idx])), pref, {**meta, "policy": policy}))
    return out
