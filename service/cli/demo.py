"""A small demo corpus that needs no download: the photographs bundled in scikit-image's wheel.

`skimage/data/*.png|jpg` ship inside the package (unlike the larger images it fetches with
pooch), so `pip install 'camp-search[demo]'` is all it takes. The files are read straight from
the installed package without importing scikit-image. The captions below were written for
these photos for this project (five per photo, MS-COCO style).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from service.cli.bulk_ingest import IngestItem

DEMO_PACKAGE = "skimage"
DEMO_EXTRA = "demo"

DEMO_CAPTIONS: dict[str, tuple[str, ...]] = {
    "astronaut.png": (
        "A smiling astronaut in an orange flight suit poses in front of an American flag.",
        "A woman in an orange space suit holding a white helmet.",
        "Official portrait of an astronaut with a model of the space shuttle behind her.",
        "A female astronaut with short brown hair wearing an orange pressure suit.",
        "An astronaut portrait with a flag and a rocket model in the background.",
    ),
    "brick.png": (
        "A grey brick wall seen at an angle.",
        "Rows of rectangular bricks with pale mortar lines.",
        "Close up of a brick wall in black and white.",
        "A wall made of long thin bricks laid in a staggered pattern.",
        "Texture of bricks and mortar running diagonally across the picture.",
    ),
    "camera.png": (
        "A man in a dark coat looks through a camera on a tripod.",
        "A black and white photo of a cameraman standing in a field.",
        "A photographer adjusting his camera outdoors on a grassy lawn.",
        "A man with a tripod camera with buildings far in the background.",
        "Grayscale picture of a person filming in an open park.",
    ),
    "chelsea.png": (
        "A close up of a tabby cat with green eyes.",
        "An orange and brown striped cat looking to the side.",
        "The face of a cat with long white whiskers.",
        "A tabby kitten staring at something next to the camera.",
        "A cat's head with yellow green eyes and striped fur.",
    ),
    "coffee.png": (
        "A cup of coffee on a red saucer with a spoon.",
        "An espresso in a red cup on a wooden table.",
        "A red coffee cup and saucer seen from above.",
        "A hot drink with foam in a cup on a wooden surface.",
        "A spoon resting on a saucer beside a cup of coffee.",
    ),
    "coins.png": (
        "Rows of old coins on a black background.",
        "A collection of ancient Greek coins laid out in a grid.",
        "Black and white photo of many silver coins.",
        "Twenty four round coins arranged in four rows.",
        "Old worn coins with portraits and figures on them.",
    ),
    "grass.png": (
        "A close up of dry grass blades in black and white.",
        "Grass seen from above in a grayscale picture.",
        "Texture of short grass with many thin leaves.",
        "A patch of lawn photographed very close.",
        "Dense grass covering the whole picture.",
    ),
    "gravel.png": (
        "A close up of small grey gravel stones.",
        "Pebbles covering the ground in black and white.",
        "Texture of crushed stone seen from above.",
        "A gravel path photographed up close.",
        "Many small rocks packed together.",
    ),
    "horse.png": (
        "A black silhouette of a horse on a white background.",
        "The outline of a standing horse in black.",
        "A horse shape facing right with its tail hanging down.",
        "A dark horse shadow with a long neck and mane.",
        "A simple black drawing of a horse standing still.",
    ),
    "hubble_deep_field.jpg": (
        "Hundreds of distant galaxies against the black of space.",
        "A telescope image of many small colourful galaxies.",
        "Stars and galaxies scattered across a dark sky.",
        "Deep space photograph full of tiny bright spots.",
        "The night sky seen by a space telescope with many galaxies.",
    ),
    "ihc.png": (
        "A microscope image of tissue stained brown and blue.",
        "Stained cells of a tissue sample under a microscope.",
        "A histology slide with brown stained glands.",
        "Tissue cut into a thin slice and coloured for a microscope.",
        "Brown and purple cells seen through a microscope.",
    ),
    "moon.png": (
        "The surface of the moon with craters in grey.",
        "A black and white picture of lunar craters.",
        "Grey rocky ground of the moon with dark spots.",
        "A close up of the moon's surface with a crater.",
        "A grayscale view of a cratered landscape on the moon.",
    ),
    "motorcycle_left.png": (
        "A red motorcycle parked inside a garage.",
        "A motorbike standing in a workshop with shelves behind it.",
        "A red and black motorcycle in a cluttered storage room.",
        "A parked motorcycle next to boxes and tools.",
        "A classic motorbike with a red fuel tank indoors.",
    ),
    "page.png": (
        "A page of printed text about image segmentation.",
        "A scanned page from a book with a title and paragraphs.",
        "Black text on a white page with a line of code.",
        "A document page explaining region based segmentation.",
        "A photo of printed text on paper.",
    ),
    "retina.jpg": (
        "A photograph of the back of a human eye with blood vessels.",
        "An orange image of a retina with red veins.",
        "A medical picture of the retina and the optic disc.",
        "Blood vessels spreading across the inside of an eye.",
        "A round red and orange scan of an eye.",
    ),
    "rocket.jpg": (
        "A rocket standing on a launch pad at night.",
        "A white rocket between two towers under a blue sky.",
        "A launch site with a rocket lit up before lift off.",
        "A space rocket waiting on its pad with bright lights.",
        "Towers and a rocket at a launch complex at dusk.",
    ),
    "text.png": (
        "Handwritten numbers and letters on a grey surface.",
        "Chalk writing on a pavement seen at an angle.",
        "Rows of hand written characters in black and white.",
        "Scribbled text on a concrete floor.",
        "A grayscale photo of writing on the ground.",
    ),
}


class DemoUnavailableError(RuntimeError):
    """The package that carries the demo photos is not installed."""


def demo_photo_dir() -> Path:
    """The folder of photos inside the installed scikit-image (the package is not imported)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoUnavailableError(
            f"the demo photos ship with scikit-image: pip install 'camp-search[{DEMO_EXTRA}]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def demo_items() -> list[IngestItem]:
    """Every demo photo with its captions; refuses a scikit-image whose files moved."""
    folder = demo_photo_dir()
    missing = [name for name in DEMO_CAPTIONS if not (folder / name).is_file()]
    if missing:
        raise DemoUnavailableError(
            f"scikit-image at {folder} lacks {', '.join(missing)}; install a version from "
            f"camp-search[{DEMO_EXTRA}]"
        )
    return [IngestItem(folder / name, captions) for name, captions in DEMO_CAPTIONS.items()]
