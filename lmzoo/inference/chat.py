"""Chat templates: how a conversation (system, user and assistant messages) becomes one prompt.

A run tuned on instructions (data.format instruct) answers best in the shape it was tuned on, so its
template is its own `data.template` (kept in the run's config.yaml): each user message fills
{instruction}, the system message fills {input} (or, when the template has no {input}, comes first as
a paragraph of its own), and each earlier reply follows its prompt and ends with <eos>, exactly as a
tuning record was read (prompt + response + <eos>). Its reply ends at <eos>, or where the template's
next instruction would begin.

Other language models, trained on running text, get the default `dialogue` template, the shape of a
play script (Tiny Shakespeare's), whose reply ends at its first blank line:

    <system message>\\n\\n
    USER:\\n<message>\\n\\nASSISTANT:\\n<reply>\\n\\n
    USER:\\n<message>\\n\\nASSISTANT:\\n

Seq2seq runs translate; they have no chat template (`Run.chat_template` refuses them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import ConfigError

SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """`turn`: one user turn up to where the reply starts, with {instruction} (the user's message) and
    optionally {input} (the system message); `eos_after_reply`: an earlier reply ends with <eos> (an
    instruction-tuned run) rather than `separator` text; `stops`: where a reply ends, besides <eos>."""

    name: str
    turn: str
    separator: str = "\n\n"
    eos_after_reply: bool = False
    stops: tuple[str, ...] = ()

    @classmethod
    def instruct(cls, template: str) -> ChatTemplate:
        """The template of a run tuned on instruction records rendered with `template`."""
        head = template.split("{instruction}")[0].strip()
        return cls("instruct", template, eos_after_reply=True, stops=(head,) if head else ())

    def render(
        self, messages: Sequence[tuple[str, str]], tokenizer: Tokenizer
    ) -> tuple[list[int], list[str]]:
        """Token ids of the prompt for (role, content) messages ending with the user's turn, and the
        pieces of it the vocabulary does not know (read as <unk>)."""
        system, turns = conversation(messages)
        encoded: list[str] = []

        def encode(text: str) -> list[int]:
            encoded.append(text)
            return tokenizer.encode(text)

        ids: list[int] = []
        text = system + "\n\n" if system and "{input}" not in self.turn else ""  # not encoded yet
        for index, (user, reply) in enumerate(turns):
            text += self.turn.format(instruction=user, input=system)
            if index == len(turns) - 1:
                break
            if self.eos_after_reply:  # as a tuning record: prompt + response + <eos>
                ids += encode(text) + encode(reply) + [tokenizer.eos_id]
                text = ""
            else:
                text += reply + self.separator
        ids += encode(text)
        return ids, tokenizer.unknown_pieces("".join(encoded))


DIALOGUE = ChatTemplate("dialogue", "USER:\n{instruction}\n\nASSISTANT:\n", stops=("\n\n",))


def conversation(messages: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """(the system text, [(user message, the reply after it)]) of a conversation that ends with the
    user's turn (its reply ""); consecutive user messages join into one turn. A ConfigError names what
    does not fit: no message, an unknown role, a reply before any user message, no user turn last."""
    if not messages:
        raise ConfigError("messages: give at least one message", param="messages")
    system: list[str] = []
    turns: list[list[str]] = []  # [user, reply]
    for index, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise ConfigError(
                f"messages[{index}].role: {role!r} is not one of {', '.join(ROLES)}", param="messages"
            )
        if role in SYSTEM_ROLES:
            system.append(content)
        elif role == "user":
            if turns and not turns[-1][1]:
                turns[-1][0] += "\n" + content
            else:
                turns.append([content, ""])
        elif not turns:
            raise ConfigError(
                f"messages[{index}]: an assistant message before any user message", param="messages"
            )
        else:
            turns[-1][1] += content
    last_role = next((role for role, _ in reversed(messages) if role not in SYSTEM_ROLES), None)
    if last_role != "user":
        raise ConfigError("messages: the conversation must end with a user message", param="messages")
    return "\n".join(system), [(user, reply) for user, reply in turns]
