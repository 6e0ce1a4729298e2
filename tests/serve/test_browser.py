"""The web page in a real headless Chromium: upload a data-set photo, labelled boxes appear."""

import json


def test_upload_shows_labelled_boxes(browser, gunicorn_server, data_dir, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(gunicorn_server + "/")
    assert "maskwatch" in page.title()
    page.set_input_files("#file", str(data_dir / "images" / "maksssksksss0.jpg"))
    page.wait_for_selector("#status[data-faces]", timeout=30_000)
    faces = int(page.get_attribute("#status", "data-faces"))
    labels = json.loads(page.get_attribute("#canvas", "data-labels"))
    assert faces >= 3 and len(labels) == faces
    assert set(labels) <= {"with_mask", "without_mask", "mask_weared_incorrect"}
    rows = page.locator("#table tbody tr")
    assert rows.count() == faces
    assert rows.first.locator("td").nth(1).inner_text() in labels
    # The boxes are really drawn: the canvas holds the photo plus coloured label pixels.
    coloured = page.evaluate("""() => {
        const c = document.getElementById('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) {
          const [r, g, b] = [d[i], d[i+1], d[i+2]];
          if ((r == 46 && g == 160 && b == 67) || (r == 220 && g == 38 && b == 38)
              || (r == 234 && g == 162 && b == 0)) n++;
        } return n; }""")
    assert coloured > 200
    page.screenshot(path=str(tmp_path / "page.png"))
    page.close()


def test_sideways_phone_photo_is_drawn_upright_like_the_server_sees_it(browser, gunicorn_server, data_dir, tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag: the server detects on the upright picture,
    so the page must draw that same upright picture under the boxes."""
    from conftest import phone_jpeg
    from PIL import Image

    photo = Image.open(data_dir / "images" / "maksssksksss0.jpg").convert("RGB")
    upload = tmp_path / "phone.jpg"  # stored turned a quarter anticlockwise, tagged to be turned back
    upload.write_bytes(phone_jpeg(photo.transpose(Image.Transpose.ROTATE_90)))
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(gunicorn_server + "/")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as answer:
        page.set_input_files("#file", str(upload))
    page.wait_for_selector("#status[data-faces]", timeout=30_000)
    served = answer.value.json()
    assert served["image"] == {"width": photo.width, "height": photo.height}  # upright
    drawn = page.evaluate("() => { const c = document.getElementById('canvas'); return [c.width, c.height]; }")
    assert drawn == [photo.width, photo.height]
    assert int(page.get_attribute("#status", "data-faces")) >= 3
    page.close()


def test_page_shows_server_errors(browser, gunicorn_server, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    page = browser.new_page()
    page.goto(gunicorn_server + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error", timeout=15_000)
    assert "not an image" in page.inner_text("#status")
    page.close()
