"""Logprobs in the OpenAI API's shapes: chat ``logprobs.content``, completions'
``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``, and an echoed
prompt's."""

from __future__ import annotations

from typing import Any

from deepserve.engine.sequence import Logprob, RequestOutput


class LogprobFormat:
    """Mixed into the serving class: needs ``self.tokenizer``."""

    tokenizer: Any

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, lps: list[Logprob]) -> dict[str, Any]:
        content = []
        for lp in lps:
            tok = self._token(lp.token_id)
            content.append({
                "token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
                "top_logprobs": [{"token": (t := self._token(i)), "logprob": v,
                                  "bytes": list(t.encode())} for i, v in lp.top]})
        return {"content": content}

    def _completion_logprobs(self, lps: list[Logprob], offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            tok = self._token(lp.token_id)
            tokens.append(tok)
            values.append(lp.logprob)
            tops.append({self._token(i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def _prompt_logprobs(self, out: RequestOutput) -> dict[str, Any]:
        """The echoed prompt's logprobs: the first token has none (null), as OpenAI's."""
        tokens, values, tops, offsets = [], [], [], []
        offset = 0
        for token_id, lp in zip(out.prompt_token_ids, out.prompt_logprobs or [],
                                strict=False):
            tok = self._token(token_id)
            tokens.append(tok)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self._token(i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}
