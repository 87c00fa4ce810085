"""HTTP answers in one line, for error messages that name what a server said."""
from __future__ import annotations

import html
import re


def first_line(body: bytes | str, limit: int = 200) -> str:
    """An HTTP body in one line of at most ``limit`` characters: the text of an HTML page
    (tags, head and scripts left out, whitespace collapsed), else its first non-empty line."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if re.search(r"<(!doctype|html|body|h1|p|title)\b", text, re.IGNORECASE):
        text = re.sub(r"<(head|script|style)\b.*?</\1\s*>", " ", text, flags=re.IGNORECASE | re.DOTALL)
        line = " ".join(html.unescape(re.sub(r"<[^>]*>", " ", text)).split())
    else:
        line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = line or "(empty body)"
    return line if len(line) <= limit else line[:limit] + "..."
