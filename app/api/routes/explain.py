"""POST /explain: which stored edit a prompt matches, and whether its memory would fire, without generating."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from memoir_core import EditInputError

from ...schemas import ExplainOut, ExplainRequest, MatchedEdit
from ...services.prompts import PromptError
from ...services.requests import LimitExceeded, decision_prompt
from ..deps import EditCaller, ReadyRuntime

router = APIRouter(tags=["generation"])


@router.post("/explain", response_model=ExplainOut, summary="Which edit would answer a prompt, and why")
def explain(body: ExplainRequest, runtime: ReadyRuntime, caller: EditCaller) -> ExplainOut:
    engine = runtime.engine
    try:
        prompt = decision_prompt(runtime, body)
    except (PromptError, LimitExceeded, EditInputError) as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    state = engine.state
    decision = engine.decide([prompt])[0]  # against the memory published now, as a generation would be
    best = None
    if decision.match is not None:
        edit = runtime.edit_log.get(decision.match.key)
        prompt_text = edit.prompt if edit.messages is None else None
        best = MatchedEdit(id=edit.id, seq=edit.seq, prompt=prompt_text, messages=edit.messages)
    return ExplainOut(
        best_match=best,
        match_ratio=round(decision.match.ratio, 6) if decision.match else None,
        threshold=engine.threshold_of(state),
        fires=decision.active,
        edit=best if decision.active else None,
        edit_seq=runtime.last_seq(state),
    )
