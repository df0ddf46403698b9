"""Grounding parser, box drawing without system fonts, CogAgent action parsing."""
from __future__ import annotations

from PIL import Image, ImageFont

from utils.chat.grounding import draw_groundings, parse_agent_output, parse_groundings


def test_boxes_multi_points_and_phrases():
    text = ("A man [[086,540,400,760]] riding a brown horse [[100,200,300,400;500,500,600,600]] "
            "next to the red sign [[250,250]].")
    gs = parse_groundings(text)
    assert [g.boxes for g in gs] == [[(86, 540, 400, 760)], [(100, 200, 300, 400), (500, 500, 600, 600)],
                                     [(250, 250)]]
    assert gs[0].phrase.lower().endswith("man") and "horse" in gs[1].phrase and "sign" in gs[2].phrase
    assert gs[0].pixel_boxes(1000, 500) == [(86, 270, 400, 380)]
    assert gs[2].pixel_boxes(200, 100) == [(50, 25)]


def test_malformed_never_crash():
    for text in ["[[12,34]] fine point", "[[1000,5,3,2]]", "[[1,2,3", "x [[a,b,c,d]]", "[[]]",
                 "[[1,2,3]]", "[[2000,1,1,1]]", "[[1,2,3,4;bad]]", "", "]] [[ ]]", "[[1,2,3,4]]]]"]:
        gs = parse_groundings(text)
        for g in gs:
            for b in g.boxes:
                assert len(b) in (2, 4) and all(0 <= v <= 1000 for v in b)
    assert parse_groundings("[[1000,5,3,2]]") == []                      # x1 < x0: refused
    assert [g.boxes for g in parse_groundings("[[12,34]]")] == [[(12, 34)]]


def test_drawing_without_system_fonts(monkeypatch):
    def no_truetype(*a, **k):
        raise OSError("cannot open resource")
    monkeypatch.setattr(ImageFont, "truetype", no_truetype)
    img = Image.new("RGB", (320, 240), (255, 255, 255))
    out = draw_groundings(img, parse_groundings("the dog [[100,100,500,500]] and a ball [[700,700]]"))
    assert out.size == img.size and out.getpixel((32, 24)) != (255, 255, 255)   # box edge drawn
    assert img.getpixel((32, 24)) == (255, 255, 255)                           # original untouched


def test_label_near_the_right_edge_stays_inside_the_image():
    img = Image.new("RGB", (320, 240), (255, 255, 255))
    out = draw_groundings(img, parse_groundings("a rather long label [[900,500,990,600]]"))
    # the box starts at x=288; its tag (above the box, y < 120) is moved left to fit
    assert any(out.getpixel((250, y)) != (255, 255, 255) for y in range(90, 118))
    assert all(out.getpixel((319, y)) == (255, 255, 255) for y in range(90, 118))


def test_agent_output():
    a = parse_agent_output("Plan: 1. Type 'CogVLM' into the search box. 2. Press enter.\n"
                           "Next Action: Type 'CogVLM' in the search box.\n"
                           "Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[212,498,787,564]]")
    assert a.plan.startswith("1. Type") and a.next_action.startswith("Type")
    assert (a.element_type, a.target, a.operation, a.text) == ("combobox", "Search", "TYPE", "CogVLM")
    assert a.boxes == [(212, 498, 787, 564)]
    b = parse_agent_output("Grounded Operation: [button] Submit -> CLICK at the box [[1,2,3,4]]")
    assert (b.element_type, b.target, b.operation, b.text, b.boxes) == ("button", "Submit", "CLICK", None, [(1, 2, 3, 4)])
    c = parse_agent_output("Next Action: scroll down. Grounded Operation: SCROLL_DOWN")
    assert c.operation == "SCROLL_DOWN"
    assert parse_agent_output("nonsense").operation is None


def test_agent_boxes_are_labelled_by_their_target_in_their_box_colour():
    from utils.chat.grounding import COLORS
    text = ("Plan: 1. Click the Open button. Next Action: Click the Open button.\n"
            "Grounded Operation:[button] Open -> CLICK at the box [[300,400,600,700]]")
    gs = parse_groundings(text)
    assert [g.phrase for g in gs] == ["Open"]                            # not "the box"
    typed = parse_groundings("Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[212,498,787,564]]")
    assert typed[0].phrase == "Search"
    assert [g.phrase for g in parse_groundings("a red circle [[010,020,300,400]] and a blue square "
                                               "[[500,500,900,900]]")] == ["a red circle", "a blue square"]
    img = Image.new("RGB", (400, 400), (255, 255, 255))
    out = draw_groundings(img, gs)
    box_colour = out.getpixel((120, 220))                               # on the box's left edge
    assert box_colour == COLORS[0]
    tag = [out.getpixel((x, y)) for x in range(120, 160) for y in range(135, 158)]
    assert COLORS[0] in tag                                             # the label's tag: same colour
