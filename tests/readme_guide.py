"""The multi-machine guide of README.md ("Running a community on several machines") as data: the
commands each machine runs and the output the guide shows. Its tests run exactly these commands."""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION = "## Running a community on several machines"
GUIDE_PORT = "4001"  # the port every machine of the guide listens on


@dataclass
class Guide:
    commands: dict[str, list[str]]  # machine letter -> its shell commands, in order
    outputs: list[str]  # the ```text blocks (what the commands print)

    @property
    def init_output(self) -> str:
        """What machine A's `fednode init` prints, as the guide shows it."""
        assert self.outputs, "the guide shows what A's `fednode init` prints"
        return self.outputs[0]

    @property
    def example_node_id(self) -> str:
        found = re.search(r"^node id:\s+(\S+)$", self.init_output, flags=re.M)
        assert found, self.init_output
        return found[1]

    @property
    def example_home(self) -> str:
        found = re.search(r"^config:\s+(\S+)/fednode/node\.toml$", self.init_output, flags=re.M)
        assert found, self.init_output
        return found[1]

    @property
    def bootstrap_address(self) -> str:
        """A's address as B and C bootstrap from it: A's printed address, its 0.0.0.0 replaced by an IP."""
        found = {b for cmds in self.commands.values() for c in cmds for b in re.findall(r"--bootstrap (\S+)", c)}
        assert len(found) == 1, found
        [address] = found
        assert re.fullmatch(rf"/ip4/[0-9.]+/tcp/{GUIDE_PORT}/p2p/{self.example_node_id}", address), address
        assert "/0.0.0.0/" not in address, "the guide bootstraps from an address it says to replace"
        return address


def read_guide(readme: str) -> Guide:
    """The guide section's ```bash blocks (up to the next heading of any level), split by their
    `# machine X` / `# every machine` comments (continued lines joined), and its ```text blocks."""
    start = readme.index(SECTION)
    end = re.compile(r"^#{2,6} ", flags=re.M).search(readme, start + len(SECTION))  # the next heading
    section = readme[start:end.start() if end else None]
    blocks = re.findall(r"^( *)```(\w*)\n(.*?)^\1```", section, flags=re.M | re.S)
    machines = sorted({m for _, lang, body in blocks if lang == "bash" for m in re.findall(r"# machine (\w)\b", body)})
    commands: dict[str, list[str]] = {m: [] for m in machines}
    outputs = []
    for indent, lang, body in blocks:
        text = "\n".join(line[len(indent):] for line in body.splitlines())
        if lang == "text":
            outputs.append(text)
            continue
        assert lang == "bash", f"the guide's code blocks are bash or text, not {lang!r}"
        targets: list[str] = []
        for line in text.replace("\\\n", " ").splitlines():
            if line.startswith("#"):
                named = re.fullmatch(r"# machine (\w)", line.strip())
                targets = [named[1]] if named else machines if line.strip() == "# every machine" else []
                assert targets, f"a guide command block says which machine runs it: {line!r}"
            elif line.strip():
                assert targets, f"guide command before any '# machine X' line: {line!r}"
                for m in targets:
                    commands[m].append(" ".join(line.split()))
    return Guide(commands, outputs)
