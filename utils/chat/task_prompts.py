"""Request templates for grounding and GUI-agent questions (our own phrasings of the request
kinds the released models were trained on). The demos offer them in
menus; `{expr}`, `{box}` and `{task}` are filled in by the user."""
from __future__ import annotations

CAPTION_WITH_BOXES = [
    "Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for each mentioned object?",
    "Describe the picture and give the box [[x0,y0,x1,y1]] of every object you mention.",
    "Write a caption for this image, placing the bounding box of each object right after its name.",
    "What is in this image? Mention each object together with its coordinates [[x0,y0,x1,y1]].",
]
EXPRESSION_TO_BOX = [
    "Can you point out {expr} in the image and provide the bounding boxes of their location?",
    "Where is {expr} in the picture? Answer with its bounding box.",
    "Find {expr} and give its coordinates [[x0,y0,x1,y1]].",
    "Locate {expr} in this image.",
]
BOX_TO_CAPTION = [
    "Tell me what you see within the designated area {box} in the picture.",
    "What is inside the region {box} of the image?",
    "Describe the object at {box}.",
]
AGENT_TASK = [
    'What steps do I need to take to "{task}"?',
    'What is the next step to "{task}"?',
    'How do I "{task}" on this screen?',
]
GROUNDING_SUFFIX = "(with grounding)"

GROUNDING_TEMPLATES = {"caption with boxes": CAPTION_WITH_BOXES, "expression to box": EXPRESSION_TO_BOX,
                       "box to caption": BOX_TO_CAPTION}


def agent_query(task: str, grounding: bool = True, template: str = AGENT_TASK[0]) -> str:
    """The task is inserted in quotes; CogAgent answers with a Grounded Operation and its box
    only when the request ends with "(with grounding)"."""
    task = task.strip().strip('"').strip()
    query = template.replace("{task}", task)
    return f"{query}{GROUNDING_SUFFIX}" if grounding else query


def fill(template: str, expr: str = "", box: str = "") -> str:
    return template.replace("{expr}", expr.strip()).replace("{box}", box.strip())
