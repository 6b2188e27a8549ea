"""The 8-task CLIP benchmark (task_vectors, Ilharco et al. ICLR 2023; used by AdaMerging,
Representation Surgery and SurgeryV2): SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD.

Each task has its class names and CLIP prompt templates (template counts: Cars 8, DTD 8,
EuroSAT 3, GTSRB 3, MNIST 1, RESISC45 18, SUN397 2, SVHN 1 — the zero-shot heads average them)
and a test split read from disk, offline:

- local image folders in the task_vectors layout (``<data>/sun397/test/<class>/*.jpg``,
  ``<data>/EuroSAT_splits/test``, ``<data>/resisc45/NWPU-RESISC45`` + ``resisc45-test.txt``,
  ``<data>/gtsrb/GTSRB/Final_Test/Images`` + ``GT-final_test.csv``, torchvision's MNIST and SVHN
  files), or a generic ``<data>/<Task>/test/<class>/`` folder for any task;
- or a Hugging Face dataset already in the local cache (``source="hf"``, needs ``datasets``).

The test split is the unlabeled adaptation data and the evaluation data, as in the papers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from mergelab.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: names, prompts (``str.format`` templates) and where its data lives."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    folders: tuple[str, ...]  # task_vectors-layout image folders, relative to the data root
    layout: str = "folder"  # folder | resisc45 | gtsrb | mnist | svhn
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_image_column: str = "image"
    hf_label_column: str = "label"

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]


def _lines(block: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in block.strip().splitlines() if s.strip())


_DIGITS = tuple(str(i) for i in range(10))

_SUN397 = _lines("""
abbey
airplane cabin
airport terminal
alley
amphitheater
amusement arcade
amusement park
anechoic chamber
apartment building outdoor
apse indoor
aquarium
aqueduct
arch
archive
arrival gate outdoor
art gallery
art school
art studio
assembly line
athletic field outdoor
atrium public
attic
auditorium
auto factory
badlands
badminton court indoor
baggage claim
bakery shop
balcony exterior
balcony interior
ball pit
ballroom
bamboo forest
banquet hall
bar
barn
barndoor
baseball field
basement
basilica
basketball court outdoor
bathroom
batters box
bayou
bazaar indoor
bazaar outdoor
beach
beauty salon
bedroom
berth
biology laboratory
bistro indoor
boardwalk
boat deck
boathouse
bookstore
booth indoor
botanical garden
bow window indoor
bow window outdoor
bowling alley
boxing ring
brewery indoor
bridge
building facade
bullring
burial chamber
bus interior
butchers shop
butte
cabin outdoor
cafeteria
campsite
campus
canal natural
canal urban
candy store
canyon
car interior backseat
car interior frontseat
carrousel
casino indoor
castle
catacomb
cathedral indoor
cathedral outdoor
cavern indoor
cemetery
chalet
cheese factory
chemistry lab
chicken coop indoor
chicken coop outdoor
childs room
church indoor
church outdoor
classroom
clean room
cliff
cloister indoor
closet
clothing store
coast
cockpit
coffee shop
computer room
conference center
conference room
construction site
control room
control tower outdoor
corn field
corral
corridor
cottage garden
courthouse
courtroom
courtyard
covered bridge exterior
creek
crevasse
crosswalk
cubicle office
dam
delicatessen
dentists office
desert sand
desert vegetation
diner indoor
diner outdoor
dinette home
dinette vehicle
dining car
dining room
discotheque
dock
doorway outdoor
dorm room
driveway
driving range outdoor
drugstore
electrical substation
elevator door
elevator interior
elevator shaft
engine room
escalator indoor
excavation
factory indoor
fairway
fastfood restaurant
field cultivated
field wild
fire escape
fire station
firing range indoor
fishpond
florist shop indoor
food court
forest broadleaf
forest needleleaf
forest path
forest road
formal garden
fountain
galley
game room
garage indoor
garbage dump
gas station
gazebo exterior
general store indoor
general store outdoor
gift shop
golf course
greenhouse indoor
greenhouse outdoor
gymnasium indoor
hangar indoor
hangar outdoor
harbor
hayfield
heliport
herb garden
highway
hill
home office
hospital
hospital room
hot spring
hot tub outdoor
hotel outdoor
hotel room
house
hunting lodge outdoor
ice cream parlor
ice floe
ice shelf
ice skating rink indoor
ice skating rink outdoor
iceberg
igloo
industrial area
inn outdoor
islet
jacuzzi indoor
jail cell
jail indoor
jewelry shop
kasbah
kennel indoor
kennel outdoor
kindergarden classroom
kitchen
kitchenette
labyrinth outdoor
lake natural
landfill
landing deck
laundromat
lecture room
library indoor
library outdoor
lido deck outdoor
lift bridge
lighthouse
limousine interior
living room
lobby
lock chamber
locker room
mansion
manufactured home
market indoor
market outdoor
marsh
martial arts gym
mausoleum
medina
moat water
monastery outdoor
mosque indoor
mosque outdoor
motel
mountain
mountain snowy
movie theater indoor
museum indoor
music store
music studio
nuclear power plant outdoor
nursery
oast house
observatory outdoor
ocean
office
office building
oil refinery outdoor
oilrig
operating room
orchard
outhouse outdoor
pagoda
palace
pantry
park
parking garage indoor
parking garage outdoor
parking lot
parlor
pasture
patio
pavilion
pharmacy
phone booth
physics laboratory
picnic area
pilothouse indoor
planetarium outdoor
playground
playroom
plaza
podium indoor
podium outdoor
pond
poolroom establishment
poolroom home
power plant outdoor
promenade deck
pub indoor
pulpit
putting green
racecourse
raceway
raft
railroad track
rainforest
reception
recreation room
residential neighborhood
restaurant
restaurant kitchen
restaurant patio
rice paddy
riding arena
river
rock arch
rope bridge
ruin
runway
sandbar
sandbox
sauna
schoolhouse
sea cliff
server room
shed
shoe shop
shopfront
shopping mall indoor
shower
skatepark
ski lodge
ski resort
ski slope
sky
skyscraper
slum
snowfield
squash court
stable
stadium baseball
stadium football
stage indoor
staircase
street
subway interior
subway station platform
supermarket
sushi bar
swamp
swimming pool indoor
swimming pool outdoor
synagogue indoor
synagogue outdoor
television studio
temple east asia
temple south asia
tennis court indoor
tennis court outdoor
tent outdoor
theater indoor procenium
theater indoor seats
thriftshop
throne room
ticket booth
toll plaza
topiary garden
tower
toyshop
track outdoor
train railway
train station platform
tree farm
tree house
trench
underwater coral reef
utility room
valley
van interior
vegetable garden
veranda
veterinarians office
viaduct
videostore
village
vineyard
volcano
volleyball court indoor
volleyball court outdoor
waiting room
warehouse indoor
water tower
waterfall block
waterfall fan
waterfall plunge
watering hole
wave
wet bar
wheat field
wind farm
windmill
wine cellar barrel storage
wine cellar bottle storage
wrestling ring indoor
yard
youth hostel
""")

_CARS = _lines("""
AM General Hummer SUV 2000
Acura RL Sedan 2012
Acura TL Sedan 2012
Acura TL Type-S 2008
Acura TSX Sedan 2012
Acura Integra Type R 2001
Acura ZDX Hatchback 2012
Aston Martin V8 Vantage Convertible 2012
Aston Martin V8 Vantage Coupe 2012
Aston Martin Virage Convertible 2012
Aston Martin Virage Coupe 2012
Audi RS 4 Convertible 2008
Audi A5 Coupe 2012
Audi TTS Coupe 2012
Audi R8 Coupe 2012
Audi V8 Sedan 1994
Audi 100 Sedan 1994
Audi 100 Wagon 1994
Audi TT Hatchback 2011
Audi S6 Sedan 2011
Audi S5 Convertible 2012
Audi S5 Coupe 2012
Audi S4 Sedan 2012
Audi S4 Sedan 2007
Audi TT RS Coupe 2012
BMW ActiveHybrid 5 Sedan 2012
BMW 1 Series Convertible 2012
BMW 1 Series Coupe 2012
BMW 3 Series Sedan 2012
BMW 3 Series Wagon 2012
BMW 6 Series Convertible 2007
BMW X5 SUV 2007
BMW X6 SUV 2012
BMW M3 Coupe 2012
BMW M5 Sedan 2010
BMW M6 Convertible 2010
BMW X3 SUV 2012
BMW Z4 Convertible 2012
Bentley Continental Supersports Conv. Convertible 2012
Bentley Arnage Sedan 2009
Bentley Mulsanne Sedan 2011
Bentley Continental GT Coupe 2012
Bentley Continental GT Coupe 2007
Bentley Continental Flying Spur Sedan 2007
Bugatti Veyron 16.4 Convertible 2009
Bugatti Veyron 16.4 Coupe 2009
Buick Regal GS 2012
Buick Rainier SUV 2007
Buick Verano Sedan 2012
Buick Enclave SUV 2012
Cadillac CTS-V Sedan 2012
Cadillac SRX SUV 2012
Cadillac Escalade EXT Crew Cab 2007
Chevrolet Silverado 1500 Hybrid Crew Cab 2012
Chevrolet Corvette Convertible 2012
Chevrolet Corvette ZR1 2012
Chevrolet Corvette Ron Fellows Edition Z06 2007
Chevrolet Traverse SUV 2012
Chevrolet Camaro Convertible 2012
Chevrolet HHR SS 2010
Chevrolet Impala Sedan 2007
Chevrolet Tahoe Hybrid SUV 2012
Chevrolet Sonic Sedan 2012
Chevrolet Express Cargo Van 2007
Chevrolet Avalanche Crew Cab 2012
Chevrolet Cobalt SS 2010
Chevrolet Malibu Hybrid Sedan 2010
Chevrolet TrailBlazer SS 2009
Chevrolet Silverado 2500HD Regular Cab 2012
Chevrolet Silverado 1500 Classic Extended Cab 2007
Chevrolet Express Van 2007
Chevrolet Monte Carlo Coupe 2007
Chevrolet Malibu Sedan 2007
Chevrolet Silverado 1500 Extended Cab 2012
Chevrolet Silverado 1500 Regular Cab 2012
Chrysler Aspen SUV 2009
Chrysler Sebring Convertible 2010
Chrysler Town and Country Minivan 2012
Chrysler 300 SRT-8 2010
Chrysler Crossfire Convertible 2008
Chrysler PT Cruiser Convertible 2008
Daewoo Nubira Wagon 2002
Dodge Caliber Wagon 2012
Dodge Caliber Wagon 2007
Dodge Caravan Minivan 1997
Dodge Ram Pickup 3500 Crew Cab 2010
Dodge Ram Pickup 3500 Quad Cab 2009
Dodge Sprinter Cargo Van 2009
Dodge Journey SUV 2012
Dodge Dakota Crew Cab 2010
Dodge Dakota Club Cab 2007
Dodge Magnum Wagon 2008
Dodge Challenger SRT8 2011
Dodge Durango SUV 2012
Dodge Durango SUV 2007
Dodge Charger Sedan 2012
Dodge Charger SRT-8 2009
Eagle Talon Hatchback 1998
FIAT 500 Abarth 2012
FIAT 500 Convertible 2012
Ferrari FF Coupe 2012
Ferrari California Convertible 2012
Ferrari 458 Italia Convertible 2012
Ferrari 458 Italia Coupe 2012
Fisker Karma Sedan 2012
Ford F-450 Super Duty Crew Cab 2012
Ford Mustang Convertible 2007
Ford Freestar Minivan 2007
Ford Expedition EL SUV 2009
Ford Edge SUV 2012
Ford Ranger SuperCab 2011
Ford GT Coupe 2006
Ford F-150 Regular Cab 2012
Ford F-150 Regular Cab 2007
Ford Focus Sedan 2007
Ford E-Series Wagon Van 2012
Ford Fiesta Sedan 2012
GMC Terrain SUV 2012
GMC Savana Van 2012
GMC Yukon Hybrid SUV 2012
GMC Acadia SUV 2012
GMC Canyon Extended Cab 2012
Geo Metro Convertible 1993
HUMMER H3T Crew Cab 2010
HUMMER H2 SUT Crew Cab 2009
Honda Odyssey Minivan 2012
Honda Odyssey Minivan 2007
Honda Accord Coupe 2012
Honda Accord Sedan 2012
Hyundai Veloster Hatchback 2012
Hyundai Santa Fe SUV 2012
Hyundai Tucson SUV 2012
Hyundai Veracruz SUV 2012
Hyundai Sonata Hybrid Sedan 2012
Hyundai Elantra Sedan 2007
Hyundai Accent Sedan 2012
Hyundai Genesis Sedan 2012
Hyundai Sonata Sedan 2012
Hyundai Elantra Touring Hatchback 2012
Hyundai Azera Sedan 2012
Infiniti G Coupe IPL 2012
Infiniti QX56 SUV 2011
Isuzu Ascender SUV 2008
Jaguar XK XKR 2012
Jeep Patriot SUV 2012
Jeep Wrangler SUV 2012
Jeep Liberty SUV 2012
Jeep Grand Cherokee SUV 2012
Jeep Compass SUV 2012
Lamborghini Reventon Coupe 2008
Lamborghini Aventador Coupe 2012
Lamborghini Gallardo LP 570-4 Superleggera 2012
Lamborghini Diablo Coupe 2001
Land Rover Range Rover SUV 2012
Land Rover LR2 SUV 2012
Lincoln Town Car Sedan 2011
MINI Cooper Roadster Convertible 2012
Maybach Landaulet Convertible 2012
Mazda Tribute SUV 2011
McLaren MP4-12C Coupe 2012
Mercedes-Benz 300-Class Convertible 1993
Mercedes-Benz C-Class Sedan 2012
Mercedes-Benz SL-Class Coupe 2009
Mercedes-Benz E-Class Sedan 2012
Mercedes-Benz S-Class Sedan 2012
Mercedes-Benz Sprinter Van 2012
Mitsubishi Lancer Sedan 2012
Nissan Leaf Hatchback 2012
Nissan NV Passenger Van 2012
Nissan Juke Hatchback 2012
Nissan 240SX Coupe 1998
Plymouth Neon Coupe 1999
Porsche Panamera Sedan 2012
Ram C/V Cargo Van Minivan 2012
Rolls-Royce Phantom Drophead Coupe Convertible 2012
Rolls-Royce Ghost Sedan 2012
Rolls-Royce Phantom Sedan 2012
Scion xD Hatchback 2012
Spyker C8 Convertible 2009
Spyker C8 Coupe 2009
Suzuki Aerio Sedan 2007
Suzuki Kizashi Sedan 2012
Suzuki SX4 Hatchback 2012
Suzuki SX4 Sedan 2012
Tesla Model S Sedan 2012
Toyota Sequoia SUV 2012
Toyota Camry Sedan 2012
Toyota Corolla Sedan 2012
Toyota 4Runner SUV 2012
Volkswagen Golf Hatchback 2012
Volkswagen Golf Hatchback 1991
Volkswagen Beetle Hatchback 2012
Volvo C30 Hatchback 2012
Volvo 240 Sedan 1993
Volvo XC90 SUV 2007
smart fortwo Convertible 2012
""")

_RESISC45 = _lines("""
airplane
airport
baseball diamond
basketball court
beach
bridge
chaparral
church
circular farmland
cloud
commercial area
dense residential
desert
forest
freeway
golf course
ground track field
harbor
industrial area
intersection
island
lake
meadow
medium residential
mobile home park
mountain
overpass
palace
parking lot
railway
railway station
rectangular farmland
river
roundabout
runway
sea ice
ship
snowberg
sparse residential
stadium
storage tank
tennis court
terrace
thermal power station
wetland
""")

# EuroSAT folders sort as AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial,
# Pasture, PermanentCrop, Residential, River, SeaLake; the names are CLIP's descriptive ones.
_EUROSAT = _lines("""
annual crop land
forest
brushland or shrubland
highway or road
industrial buildings or commercial buildings
pasture land
permanent crop land
residential buildings or homes or apartments
river
lake or sea
""")

_GTSRB = _lines("""
red and white circle 20 kph speed limit
red and white circle 30 kph speed limit
red and white circle 50 kph speed limit
red and white circle 60 kph speed limit
red and white circle 70 kph speed limit
red and white circle 80 kph speed limit
end / de-restriction of 80 kph speed limit
red and white circle 100 kph speed limit
red and white circle 120 kph speed limit
red and white circle red car and black car no passing
red and white circle red truck and black car no passing
red and white triangle road intersection warning
white and yellow diamond priority road
red and white upside down triangle yield right-of-way
stop
empty red and white circle
red and white circle no truck entry
red circle with white horizonal stripe no entry
red and white triangle with exclamation mark warning
red and white triangle with black left curve approaching warning
red and white triangle with black right curve approaching warning
red and white triangle with black double curve approaching warning
red and white triangle rough / bumpy road warning
red and white triangle car skidding / slipping warning
red and white triangle with merging / narrow lanes warning
red and white triangle with person digging / construction / road work warning
red and white triangle with traffic light approaching warning
red and white triangle with person walking warning
red and white triangle with child and person walking warning
red and white triangle with bicyle warning
red and white triangle with snowflake / ice warning
red and white triangle with deer warning
white circle with gray strike bar no speed limit
blue circle with white right turn arrow mandatory
blue circle with white left turn arrow mandatory
blue circle with white forward arrow mandatory
blue circle with white forward or right turn arrow mandatory
blue circle with white forward or left turn arrow mandatory
blue circle with white keep right arrow mandatory
blue circle with white keep left arrow mandatory
blue circle with white arrows indicating a traffic circle
white circle with gray strike bar indicating no passing for cars has ended
white circle with gray strike bar indicating no passing for trucks has ended
""")

_DTD = _lines("""
banded
blotchy
braided
bubbly
bumpy
chequered
cobwebbed
cracked
crosshatched
crystalline
dotted
fibrous
flecked
freckled
frilly
gauzy
grid
grooved
honeycombed
interlaced
knitted
lacelike
lined
marbled
matted
meshed
paisley
perforated
pitted
pleated
polka-dotted
porous
potholed
scaly
smeared
spiralled
sprinkled
stained
stratified
striped
studded
swirly
veined
waffled
woven
wrinkled
zigzagged
""")

_PHOTO_2 = ("a photo of a {}.", "a photo of the {}.")
_CARS_T = _PHOTO_2 + (
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)
_DTD_T = tuple(
    f"a photo of {art} {{}} {kind}."
    for art in ("a", "the")
    for kind in ("texture", "pattern", "thing", "object")
)
_EUROSAT_T = tuple(f"a centered satellite photo of {a}{{}}." for a in ("", "a ", "the "))
_GTSRB_T = tuple(
    f'a {how} photo of a "{{}}" traffic sign.' for how in ("zoomed in", "centered", "close up")
)
_NUMBER_T = ('a photo of the number: "{}".',)
_RESISC45_T = tuple(
    f"{src} {what} of {art}{{}}."
    for art in ("", "a ", "the ")
    for what in ("imagery", "photo", "view")
    for src in ("satellite", "aerial")
)

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "SUN397", _SUN397, _PHOTO_2, ("sun397/test", "sun397/val"), hf_dataset="tanganke/sun397"
        ),
        TaskSpec(
            "Cars",
            _CARS,
            _CARS_T,
            ("stanford_cars/test", "cars/test"),
            hf_dataset="tanganke/stanford_cars",
        ),
        TaskSpec(
            "RESISC45",
            _RESISC45,
            _RESISC45_T,
            ("resisc45/test",),
            layout="resisc45",
            hf_dataset="tanganke/resisc45",
        ),
        TaskSpec(
            "EuroSAT", _EUROSAT, _EUROSAT_T, ("EuroSAT_splits/test",), hf_dataset="tanganke/eurosat"
        ),
        TaskSpec(
            "SVHN",
            _DIGITS,
            _NUMBER_T,
            ("svhn/test",),
            layout="svhn",
            hf_dataset="ufldl-stanford/svhn",
            hf_config="cropped_digits",
        ),
        TaskSpec(
            "GTSRB", _GTSRB, _GTSRB_T, ("gtsrb/test",), layout="gtsrb", hf_dataset="tanganke/gtsrb"
        ),
        TaskSpec(
            "MNIST", _DIGITS, _NUMBER_T, ("mnist/test",), layout="mnist", hf_dataset="ylecun/mnist"
        ),
        TaskSpec("DTD", _DTD, _DTD_T, ("dtd/test", "dtd/val"), hf_dataset="tanganke/dtd"),
    )
}
VIT8: tuple[str, ...] = tuple(TASKS)


def resolve_tasks(names: Sequence[str]) -> list[TaskSpec]:
    """Task specs for ``names`` (case-insensitive); an unknown name is a ConfigError listing
    the valid ones."""
    by_lower = {k.lower(): v for k, v in TASKS.items()}
    out = []
    for n in names:
        spec = by_lower.get(str(n).lower())
        if spec is None:
            raise ConfigError(f"unknown task {n!r}; valid tasks are: {', '.join(VIT8)}")
        out.append(spec)
    if not out:
        raise ConfigError(f"no tasks given; valid tasks are: {', '.join(VIT8)}")
    return out


def data_root(configured: str | os.PathLike | None) -> Path:
    """The data root: the config value, else ``$MERGELAB_DATA``."""
    root = configured or os.environ.get("MERGELAB_DATA")
    if not root:
        raise ConfigError(
            "no data root: set model.data=/path/to/datasets or the MERGELAB_DATA environment "
            "variable (the task_vectors layout: <root>/sun397/test/<class>/..., ...)"
        )
    return Path(os.path.expanduser(str(root)))


# --- datasets -----------------------------------------------------------------------------


class LabelledFiles(Dataset):
    """(image file, label) pairs → ``(transform(RGB image), label)``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else img), label


class _Transformed(Dataset):
    """A dataset of (PIL image or array, label) with the CLIP transform applied."""

    def __init__(self, base, transform: Callable | None, image_key=0, label_key=1) -> None:
        self.base, self.transform = base, transform
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        img, label = item[self.image_key], item[self.label_key]
        from PIL import Image

        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(label)


def _norm(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def _class_labels(spec: TaskSpec, class_dirs: list[str], where: Path) -> dict[str, int]:
    """Label of each class folder: by name when every folder names a class (in any spelling
    with ``_`` for spaces), by integer when folders are ``0..C-1``, else by sorted order
    (torchvision ImageFolder's rule, which the task_vectors layouts follow)."""
    names = {_norm(c): i for i, c in enumerate(spec.classnames)}
    if all(_norm(d) in names for d in class_dirs):
        return {d: names[_norm(d)] for d in class_dirs}
    if all(d.isdigit() and int(d) < len(spec.classnames) for d in class_dirs):
        return {d: int(d) for d in class_dirs}
    if len(class_dirs) != len(spec.classnames):
        raise ConfigError(
            f"{spec.name}: {where} has {len(class_dirs)} class folders, expected "
            f"{len(spec.classnames)} (one per class, sorted in class-index order)"
        )
    return {d: i for i, d in enumerate(sorted(class_dirs))}


def _image_folder(spec: TaskSpec, root: Path, keep: Callable[[str], bool] | None = None):
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    labels = _class_labels(spec, class_dirs, root)
    samples = []
    for d in class_dirs:
        for f in sorted((root / d).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and (keep is None or keep(f.name)):
                samples.append((str(f), labels[d]))
    if not samples:
        raise ConfigError(f"{spec.name}: no images found under {root}")
    return samples


def _local_candidates(spec: TaskSpec, root: Path) -> list[Path]:
    return [root / spec.name / "test", *(root / f for f in spec.folders)]


# The task_vectors layouts that are not plain image folders.
_LAYOUTS = {
    "resisc45": "resisc45/NWPU-RESISC45/<class>/ with resisc45/resisc45-test.txt",
    "gtsrb": "gtsrb/GTSRB/Final_Test/Images/ with gtsrb/GT-final_test.csv",
    "mnist": "MNIST/raw/t10k-images-idx3-ubyte (torchvision's MNIST files)",
    "svhn": "svhn/test_32x32.mat (torchvision's SVHN file)",
}


def _expected(spec: TaskSpec, root: Path) -> str:
    where = ", ".join(str(p) for p in _local_candidates(spec, root))
    if spec.layout in _LAYOUTS:
        where += f", or {root}/{_LAYOUTS[spec.layout]}"
    return where


def _load_local(spec: TaskSpec, root: Path, transform: Callable | None) -> Dataset | None:
    """The task's local test split, or None when none of its layouts is present."""
    for folder in _local_candidates(spec, root):
        if folder.is_dir():
            return LabelledFiles(_image_folder(spec, folder), transform)
    if spec.layout == "resisc45":
        images, split = root / "resisc45" / "NWPU-RESISC45", root / "resisc45" / "resisc45-test.txt"
        if images.is_dir() and split.is_file():
            wanted = set(split.read_text().split())
            return LabelledFiles(_image_folder(spec, images, keep=wanted.__contains__), transform)
    if spec.layout == "gtsrb":
        images, table = (
            root / "gtsrb" / "GTSRB" / "Final_Test" / "Images",
            root / "gtsrb" / "GT-final_test.csv",
        )
        if images.is_dir() and table.is_file():
            with open(table, newline="") as f:
                rows = csv.DictReader(f, delimiter=";", skipinitialspace=True)
                samples = [(str(images / r["Filename"]), int(r["ClassId"])) for r in rows]
            return LabelledFiles(samples, transform)
    if spec.layout == "mnist" and (root / "MNIST" / "raw").is_dir():
        from torchvision.datasets import MNIST

        return _Transformed(MNIST(str(root), train=False, download=False), transform)
    if spec.layout == "svhn" and (root / "svhn" / "test_32x32.mat").is_file():
        from torchvision.datasets import SVHN

        return _Transformed(SVHN(str(root / "svhn"), split="test", download=False), transform)
    return None


def _hf_local_dirs(spec: TaskSpec, root: Path | None) -> list[Path]:
    """Folders under the data root that may hold the task's HF dataset: ``<root>/<owner>/<name>``
    (the repo id as a path) or ``<root>/<name>``."""
    if root is None or spec.hf_dataset is None:
        return []
    return [root / spec.hf_dataset, root / spec.hf_dataset.split("/")[-1]]


def _hf_split(ds, spec: TaskSpec, split: str, where: str):
    """The ``split`` of a DatasetDict (a Dataset is taken as that split already)."""
    if hasattr(ds, "keys") and not hasattr(ds, "features"):
        if split not in ds:
            raise ConfigError(f"{spec.name}: {where} has splits {sorted(ds)}, expected {split!r}")
        return ds[split]
    return ds


def _load_hf(spec: TaskSpec, transform: Callable | None, split: str, root: Path | None) -> Dataset:
    """The task's Hugging Face dataset, offline only (never downloads), from the first of:

    1. ``<root>/<owner>/<name>`` or ``<root>/<name>``: a ``save_to_disk`` folder, or a copy of
       the dataset repository (``huggingface-cli download --repo-type dataset <id> --local-dir``);
    2. the ``datasets`` cache (``datasets.load_dataset(<id>)`` run once with network);
    3. the hub cache (``huggingface-cli download --repo-type dataset <id>``).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{spec.name}: reading Hugging Face datasets needs the `datasets` package "
            "(pip install datasets)"
        ) from None
    # The environment variable only counts before `datasets` is first imported; the flag is
    # what load_dataset consults, so keep it on for this call whatever the import order was.
    # (HF_DATASETS_OFFLINE in datasets < 3, HF_HUB_OFFLINE since.)
    flags = {
        n: getattr(datasets.config, n)
        for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if hasattr(datasets.config, n)
    }
    for n in flags:
        setattr(datasets.config, n, True)
    try:
        ds = _load_hf_offline(datasets, spec, split, root)
    finally:
        for n, v in flags.items():
            setattr(datasets.config, n, v)
    for col in (spec.hf_image_column, spec.hf_label_column):
        if col not in ds.column_names:
            raise ConfigError(
                f"{spec.name}: the Hugging Face dataset has columns {ds.column_names}, expected "
                f"{spec.hf_image_column!r} (images) and {spec.hf_label_column!r} (labels)"
            )
    return _Transformed(ds, transform, spec.hf_image_column, spec.hf_label_column)


def _load_hf_offline(datasets, spec: TaskSpec, split: str, root: Path | None):
    for folder in _hf_local_dirs(spec, root):
        if not folder.is_dir():
            continue
        saved = any(
            (folder / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
        )
        try:
            if saved:
                return _hf_split(datasets.load_from_disk(str(folder)), spec, split, str(folder))
            return datasets.load_dataset(str(folder), spec.hf_config, split=split)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"{spec.name}: cannot read the Hugging Face dataset in {folder} "
                f"({type(e).__name__}: {e}); expected a save_to_disk folder or a copy of the "
                f"{spec.hf_dataset!r} repository"
            ) from None
    try:  # the datasets cache (also consults the hub cache in recent versions)
        return datasets.load_dataset(spec.hf_dataset, spec.hf_config, split=split)
    except Exception as e:
        first = e
    try:  # a hub-cache snapshot on its own (huggingface-cli download, no datasets cache)
        from huggingface_hub import snapshot_download

        snap = snapshot_download(spec.hf_dataset, repo_type="dataset", local_files_only=True)
    except Exception:
        snap = None
    if snap is not None:
        try:
            return datasets.load_dataset(snap, spec.hf_config, split=split)
        except Exception as e:
            first = e
    where = ", ".join(str(p) for p in _hf_local_dirs(spec, root))
    raise ConfigError(
        f"{spec.name}: the Hugging Face dataset {spec.hf_dataset!r} (split {split!r}) is not "
        f"available offline ({type(first).__name__}: {first}); fetch it once on a machine with "
        f"network via datasets.load_dataset({spec.hf_dataset!r}) or `huggingface-cli download "
        f"--repo-type dataset {spec.hf_dataset}`"
        + (f", or put a save_to_disk copy at {where}" if where else "")
    ) from None


def load_test_set(
    spec: TaskSpec,
    root: str | os.PathLike | None,
    transform: Callable | None,
    source: str = "auto",
    max_items: int | None = None,
    seed: int = 0,
) -> Dataset:
    """The task's test split (= unlabeled adaptation data = evaluation data).

    ``source``: ``"local"`` (image folders / torchvision files under ``root``), ``"hf"`` (a
    cached Hugging Face dataset) or ``"auto"`` (local if present, else HF). ``max_items``
    keeps a fixed random subset (for quick runs); ``None`` keeps everything.
    """
    if source not in ("auto", "local", "hf"):
        raise ConfigError(f"data source must be auto, local or hf, got {source!r}")
    ds = None
    configured = root or os.environ.get("MERGELAB_DATA")
    # "auto" with no data root configured goes straight to Hugging Face; "local" needs one.
    if source == "local" or (source == "auto" and configured):
        base = data_root(root)
        ds = _load_local(spec, base, transform)
        if ds is None and source == "local":
            raise ConfigError(
                f"{spec.name}: test data not found; expected an image folder (one sub-folder per "
                f"class) at one of: {_expected(spec, base)}"
            )
    if ds is None:
        if spec.hf_dataset is None:
            raise ConfigError(f"{spec.name}: no local data and no Hugging Face dataset known")
        try:
            ds = _load_hf(spec, transform, "test", data_root(root) if configured else None)
        except ConfigError as e:
            if source == "hf" or not configured:
                raise
            raise ConfigError(
                f"{spec.name}: test data not found; expected an image folder (one sub-folder per "
                f"class) at one of: {_expected(spec, data_root(root))}, "
                f"or the Hugging Face dataset {spec.hf_dataset!r} in the local cache ({e})"
            ) from None
    if max_items is not None and max_items < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:max_items].sort().values.tolist())
    return ds
