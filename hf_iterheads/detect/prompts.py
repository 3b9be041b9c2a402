"""Prompts that pretrained LMs can do: few-shot examples before each probe, and chat-template wrapping.

A pretrained model given ``3 7 2 -> ...`` cold has no idea which task is meant; K worked examples of the
same task (``shots``) show it, and instruction-tuned models expect their chat format. Both only add text
around the probe: the values of the probe itself are still located by their character spans, and only
they are scored (the shots' values are context, never queries or keys). Every probe gets the same shots, so
they are a prefix all probes share.

* few-shot: the K examples, rendered with the same template, then the probe, one per line (a blank line
  between them when the template itself spans several lines);
* chat: each example and the probe become a user turn (the template up to the states, e.g. ``3 7 2 ->``)
  and an assistant turn (the states), rendered by the tokenizer's own ``chat_template``. The token before
  ``s_1`` (EoI's role) is then the end of the assistant header.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import IterHeadsError

DEFAULT_TEMPLATE = "{inputs} -> {states}"
_PLACEHOLDER = re.compile(r"\{(inputs|states)(?::([^{}]*))?\}")

Span = tuple[int, int]
Chain = tuple[Sequence[int], Sequence[int]]


def render(template: str, inputs: Sequence[int], states: Sequence[int]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The probe text and the character span of every input and state value."""
    found = list(_PLACEHOLDER.finditer(template))
    kinds = [m.group(1) for m in found]
    if kinds != ["inputs", "states"]:
        raise IterHeadsError(
            f"template {template!r} must contain {{inputs}} then {{states}} exactly once each "
            "(optionally {inputs:SEP} to join values with SEP)"
        )
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise IterHeadsError(f"template {template!r} has an unknown placeholder; only {{inputs}} and {{states}} exist")
    text, spans, pos = "", {"inputs": [], "states": []}, 0
    for m in found:
        text += template[pos : m.start()]
        sep = " " if m.group(2) is None else m.group(2)
        values = inputs if m.group(1) == "inputs" else states
        for i, v in enumerate(values):
            if i:
                text += sep
            spans[m.group(1)].append((len(text), len(text) + len(str(v))))
            text += str(v)
        pos = m.end()
    text += template[pos:]
    return text, spans["inputs"], spans["states"]


def shot_chains(task, lengths: list[int], probes: list[tuple[np.ndarray, np.ndarray]], k: int, seed: int) -> list[list[Chain]]:
    """The same ``k`` worked examples for every probe, lengths drawn from ``lengths``, never a probe's own inputs.

    One set for all: the shots become a token prefix every probe shares, computed once (the detector's
    shared-prefix cache) instead of once per probe. A shot equal to a probe would let a copying (induction)
    head answer without doing the task, so such draws are redrawn.
    """
    if k <= 0:
        return [[] for _ in probes]
    rng = np.random.default_rng([int(seed), 1])
    taken = {tuple(np.asarray(xs).tolist()) for xs, _ in probes}
    shots = []
    for _ in range(k):
        for _attempt in range(100):  # a one-value alphabet can only repeat a probe: accept it then
            cand = task.sample_inputs(1, int(rng.choice(lengths)), rng)
            if tuple(cand[0].tolist()) not in taken:
                break
        shots.append((cand[0].tolist(), task.run(cand)[0].tolist()))
    return [list(shots) for _ in probes]


def few_shot(template: str, shots: Sequence[Chain], inputs: Sequence[int], states: Sequence[int]) -> tuple[str, list[Span], list[Span]]:
    """The shots, then the probe; spans are the probe's values only."""
    sep = "\n\n" if "\n" in template else "\n"
    prefix = "".join(render(template, a, b)[0] + sep for a, b in shots)
    text, xs, ss = render(template, inputs, states)
    shift = len(prefix)
    return prefix + text, [(a + shift, b + shift) for a, b in xs], [(a + shift, b + shift) for a, b in ss]


def _turns(template: str, inputs: Sequence[int], states: Sequence[int]) -> tuple[str, str, list[Span], list[Span]]:
    """(user text, assistant text, input spans in the user text, state spans in the assistant text)."""
    text, xs, ss = render(template, inputs, states)
    cut = ss[0][0]
    user, answer = text[:cut], text[cut:].rstrip()
    lead = len(user) - len(user.lstrip())
    user = user.strip()
    return user, answer, [(a - lead, b - lead) for a, b in xs], [(a - cut, b - cut) for a, b in ss]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat(
    tokenizer, template: str, shots: Sequence[Chain], inputs: Sequence[int], states: Sequence[int]
) -> tuple[str, list[Span], list[Span]]:
    """The conversation as the tokenizer's chat template writes it; spans are the probe's values only.

    Raises when the tokenizer has no chat template, or when the template rewrites the messages so that
    their text can no longer be found (then positions could not be trusted).
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not has_chat_template(tokenizer):
        raise IterHeadsError(f"tokenizer {name!r} has no chat template; drop --chat (use --shots K for a base model)")
    messages, spans = [], None
    for a, b in [*shots, (inputs, states)]:
        user, answer, xs, ss = _turns(template, a, b)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        spans = (xs, ss)
    # transformers renders chat templates with jinja2
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as err:  # the template refuses this conversation
        raise IterHeadsError(f"the chat template of {name!r} cannot render the probes: {str(err).strip().splitlines()[0]}") from None
    end, starts = len(text), []
    for m in reversed(messages):  # from the end: a system prompt (dates, digits) comes first and is never matched
        found = text.rfind(m["content"], 0, end)
        if found < 0:
            raise IterHeadsError(f"the chat template of {name!r} rewrites the message {m['content']!r}; its values cannot be located")
        starts.append(found)
        end = found
    (xs, ss), (s, u) = spans, starts[:2]
    return text, [(a + u, b + u) for a, b in xs], [(a + s, b + s) for a, b in ss]
