"""Ratings given in `dialogtrain chat`, appended as training rows to the feedback file.

    /good, /bad               rate the last reply: a KTO row, the whole conversation as the prompt
        {"prompt": [messages up to the last user turn], "completion": reply, "label": true | false}
    /good A, /prefer NAME     with --compare, pick the better of the two replies to the last message
    /bad B                    (A: the first checkpoint, B: the --compare one, or a bot's name): a pair
        {"prompt": [messages], "chosen": the better reply, "rejected": the other}

The rows are in exactly the formats the trainers read: `dialogtrain kto` takes the whole file (ratings,
and each pair as one desirable and one undesirable completion), `dialogtrain dpo` its pairs (with
--skip-bad-rows when the file holds ratings too). A pair's prompt is the conversation the better bot
saw (each bot keeps its own history; in the first exchange both are the same). The file is appended one
line per rating, so a chat that ends abruptly loses nothing already rated. Default file: feedback.jsonl
in the checkpoint's run folder (beside final/), else in the checkpoint's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dialogtrain.errors import UserError

FEEDBACK_COMMANDS = ("/good", "/bad", "/prefer")
FEEDBACK_FILE = "feedback.jsonl"
HELP = """  /good, /bad     rate the last reply (appended to the feedback file that `dialogtrain kto` trains on)
  /good A, /prefer NAME, /bad B   with --compare: the better of the two replies (A: the first checkpoint,
                  B: the --compare one), a pair for `dialogtrain dpo` and `dialogtrain kto`"""


def default_feedback_path(checkpoint: str) -> Path:
    """feedback.jsonl in the run folder of `checkpoint` (RUN, or RUN/final with RUN/run.json), else in the
    checkpoint's folder (the folder of a .gguf file)."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        path = path.parent
    elif path.name == "final" and (path.parent / "run.json").is_file():
        path = path.parent
    return path / FEEDBACK_FILE


def unwritable(path: Path) -> str | None:
    """Why ratings cannot be appended to `path`, or None when they can."""
    folder = path.parent
    if path.is_dir():
        return "it is a folder"
    if not folder.is_dir():
        return f"no folder {folder}"
    if path.exists() and not os.access(path, os.W_OK):
        return "permission denied"
    if not path.exists() and not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


@dataclass
class Feedback:
    """The feedback file of a chat and what was rated: each reply is rated once."""

    path: Path
    chosen_by_user: bool = False  # --feedback given: the chat refuses to start when it cannot be written
    rated: int = 0
    last_rated: list | None = field(default=None, repr=False)  # the history (list object) last rated

    @classmethod
    def open(cls, feedback: str | None, checkpoint: str) -> Feedback:
        """--feedback FILE (refused now, UserError, when it cannot be written) or the default file (checked when
        a rating is written, so that a chat from a read-only folder still starts)."""
        if feedback is None:
            return cls(default_feedback_path(checkpoint))
        path = Path(feedback).expanduser()
        problem = unwritable(path)
        if problem:
            raise UserError(f"--feedback {feedback}: cannot write ratings there ({problem})")
        return cls(path, chosen_by_user=True)

    def rate(self, command: str, argument: str, bots: list) -> str:
        """Append the rating `command argument` of the last replies of `bots` (chat.session.Bot) to the file;
        returns the line to show the user."""
        try:
            row = rating_row(command, argument, bots) if len(bots) == 1 else pair_row(command, argument, bots)
        except ValueError as why:
            return f"({why})"
        if bots[0].history is self.last_rated:
            return "(this reply is already rated; the next message gets a new one)"
        problem = unwritable(self.path)
        if problem:
            return f"(cannot write ratings to {self.path} ({problem}); start the chat with --feedback FILE)"
        try:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as err:
            return f"(cannot write ratings to {self.path} ({err.strerror}); start the chat with --feedback FILE)"
        self.last_rated, self.rated = bots[0].history, self.rated + 1
        what = (f"the reply {'good' if row['label'] else 'bad'}" if "label" in row else
                next(f"{bot.name}'s reply better" for bot in bots if bot.history[-1]["content"] == row["chosen"]))
        return f"(rated {what}: {self.rated} this chat, in {self.path})"


def last_exchange(bot) -> tuple[list[dict], str]:
    """(the conversation before the bot's last reply, ending with the user's message; the reply)."""
    if len(bot.history) < 2 or bot.history[-1]["role"] != "assistant":
        raise ValueError("nothing to rate yet: rate a reply after it is given")
    reply = bot.history[-1]["content"]
    if not reply.strip():
        raise ValueError("the last reply is empty: nothing to rate")
    return bot.history[:-1], reply


def rating_row(command: str, argument: str, bots: list) -> dict:
    """A KTO row for /good or /bad of one bot."""
    if command == "/prefer" or argument:
        raise ValueError(f"{command} {argument}".strip() + ": with one bot, rate its last reply with /good or /bad")
    prompt, reply = last_exchange(bots[0])
    return {"prompt": prompt, "completion": reply, "label": command == "/good"}


def pair_row(command: str, argument: str, bots: list) -> dict:
    """A preference pair for /good X, /prefer X (X is the better) or /bad X (the other is) of two bots."""
    names = {"a": 0, "b": 1, **{bot.name.lower(): k for k, bot in enumerate(bots)}}
    if argument.lower() not in names:
        choices = ", ".join(["A", "B", *(bot.name for bot in bots)])
        raise ValueError(f"with two bots, say which reply: {command} A|B|NAME ({choices}); /good and /prefer "
                         "name the better one, /bad the worse")
    picked = names[argument.lower()]
    better = picked if command in ("/good", "/prefer") else 1 - picked
    (prompt, chosen), (other_prompt, rejected) = last_exchange(bots[better]), last_exchange(bots[1 - better])
    if prompt[-1] != other_prompt[-1]:
        raise ValueError("the two bots did not both answer the last message: nothing to compare")
    if chosen.strip() == rejected.strip():
        raise ValueError("the two replies are the same: no preference to record")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
