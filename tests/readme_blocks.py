"""The README's command blocks, as a user reads them: every fenced ```sh block, in order,
with the directive of the HTML comment lines just above it (invisible on the rendered page):

    <!-- readme-test: skip: REASON -->        not run here, and why
    <!-- readme-test: background: TEXT -->    a long-running program (serve, storescp,
                                              Orthanc): started, then waited for until its
                                              output holds TEXT ("port N": until N accepts)
    <!-- readme-test: stop: COMMAND -->       first stop the background block COMMAND (the
                                              user's Ctrl-C in that shell)
    <!-- readme-test: append: ARGS -->        ARGS added to the block's last command, to make a
                                              long training run short (said in the README)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(skip|background|stop|append):\s*(.*?)\s*-->")


@dataclass
class Block:
    line: int  # where the block starts in the README (1-based), for messages
    heading: str  # the section it belongs to
    text: str
    skip: str | None = None
    background: str | None = None
    stop: list[str] = field(default_factory=list)
    append: str | None = None

    @property
    def name(self) -> str:
        first = self.text.strip().splitlines()[0]
        return f"README line {self.line} ({self.heading}): {first[:70]}"

    def command(self) -> str:
        """The block as bash runs it, with `append` added to its last command."""
        if not self.append:
            return self.text
        lines = self.text.rstrip("\n").split("\n")
        lines[-1] = f"{lines[-1]} {self.append}"
        return "\n".join(lines) + "\n"


def readme_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").split("\n")
    heading = ""
    pending: list[tuple[str, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        match = DIRECTIVE.search(line)
        if match:
            pending.append((match.group(1), match.group(2)))
        elif line.strip() == "```sh":
            body = []
            index += 1
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            block = Block(line=index - len(body), heading=heading, text="\n".join(body) + "\n")
            for kind, value in pending:
                if kind == "stop":
                    block.stop.append(value)
                else:
                    setattr(block, kind, value)
            blocks.append(block)
            pending = []
        elif line.strip() and not line.startswith("<!--"):
            pending = []  # a directive belongs to the block right below it
        index += 1
    return blocks
