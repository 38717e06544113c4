"""Category-specific safe responses in the language of the input (English, Chinese).

Medical norms get a pointer to a professional with the reason (the user may have a real need), not a refusal wall;
self-harm gets support resources; the other categories a short decline that says why.
"""

from __future__ import annotations

SAFE_RESPONSES: dict[str, dict[str, str]] = {
    "en": {
        "violence": "I can't help with hurting people or making weapons ({reason}). If someone is in danger, please "
                    "contact your local emergency number.",
        "self_harm": "It sounds like you may be going through something very painful, and I can't help with that "
                     "request ({reason}). You don't have to face this alone: please reach out to someone you trust or a "
                     "crisis line (in the US call or text 988; elsewhere, your local emergency number or findahelpline.com).",
        "illegal_drugs": "I can't help with making or getting illegal drugs ({reason}). If you or someone close to you "
                         "is struggling with drug use, a doctor or a local addiction service can help confidentially.",
        "sexual_minors": "I can't help with that: it involves the sexual exploitation of minors ({reason}). If a child "
                         "is at risk, please contact the police or a child-protection hotline.",
        "hate": "I can't help with content that attacks people for who they are ({reason}).",
        "privacy": "I can't help with finding or sharing someone's private information ({reason}).",
        "cybercrime": "I can't help with breaking into systems or writing malicious software ({reason}). I'm glad to "
                      "help with protecting your own accounts and systems instead.",
        "medical": "This is a question for a doctor or pharmacist ({reason}): the safe answer depends on your "
                   "health, your other medicines and your history, which they can check. Please ask them (or a "
                   "pharmacy or medical helpline); in an emergency call your local emergency number.",
        "sexual": "I can't write sexually explicit content ({reason}).",
        "toxicity": "I'd rather not write insults or abuse ({reason}); I'm glad to help say it another way.",
        "misinformation": "I can't help present that as fact ({reason}); I can share what reliable sources say.",
        "other": "I can't help with that request ({reason}).",
    },
    "zh": {
        "violence": "我不能协助伤害他人或制造武器（{reason}）。如果有人身处危险，请立即拨打110或当地紧急电话。",
        "self_harm": "听起来你可能正在经历很痛苦的事情，我不能协助这个请求（{reason}）。你并不孤单：请联系你信任的人，"
                     "或拨打心理援助热线（如全国心理援助热线 400-161-9995），紧急情况请拨打120或110。",
        "illegal_drugs": "我不能协助制造或获取毒品（{reason}）。如果你或身边的人正受毒品困扰，可以向医生或戒毒机构寻求保密的帮助。",
        "sexual_minors": "我不能协助这个请求：它涉及对未成年人的性剥削（{reason}）。如果有儿童面临危险，请报警或联系儿童保护机构。",
        "hate": "我不能协助攻击或贬低某一群体的内容（{reason}）。",
        "privacy": "我不能协助查找或公开他人的隐私信息（{reason}）。",
        "cybercrime": "我不能协助入侵系统或编写恶意软件（{reason}）。如果你想保护自己的账号和设备，我很乐意帮忙。",
        "medical": "这个问题需要医生或药师来回答（{reason}）：安全的做法取决于你的身体状况、正在服用的其他药物和病史，"
                   "他们可以为你核实。请咨询医生或药师；紧急情况请拨打120。",
        "sexual": "我不能撰写色情内容（{reason}）。",
        "toxicity": "我不想写辱骂或攻击性的内容（{reason}），可以帮你换一种表达方式。",
        "misinformation": "我不能把这当作事实来陈述（{reason}），可以告诉你可靠来源的说法。",
        "other": "我不能协助这个请求（{reason}）。",
    },
}


def safe_response(category: str, reason: str, language: str = "en") -> str:
    """The safe text for a blocked `category`, in `language` ("en" / "zh"), with the one-line `reason` inside."""
    table = SAFE_RESPONSES.get(language, SAFE_RESPONSES["en"])
    return table.get(category, table["other"]).format(reason=reason)
