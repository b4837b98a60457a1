"""Gender accuracy of the attribute pipeline on the shared photos that carry identity labels.

    STREAMER_MODEL_DIR=... STREAMER_MEDIA_DIR=... python tools/gender_eval.py [--min-confidence P] [--details]

Each photo of /work/shared/media/identities.csv is run through the engine as `streamer analyze` does
(configured detector, the photo's largest face, the gender head with its crop and flip averaging,
abstaining below attributes.min_gender_confidence as `combine_attributes` does) and
compared with the person's public gender from the table below (labelled by hand for this evaluation
from who the person is; the deepface clusters are named by their first photo). Prints one JSON line:
faces evaluated, accuracy over all of them (an abstention counts as wrong), how many the pipeline
abstained on at attributes.min_gender_confidence (or --min-confidence), and the accuracy of the rest.
No race or other attribute is labelled or estimated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

PUBLIC_GENDER = {
    "deepface:angelina": "woman",  # Angelina Jolie
    "deepface:cluster_img3": "woman",  # Jennifer Aniston
    "deepface:cluster_img8": "woman",  # Scarlett Johansson
    "deepface:cluster_img13": "man",  # Mark Zuckerberg
    "deepface:cluster_img16": "man",  # Jack Dorsey
    "deepface:cluster_img18": "man",  # Elon Musk
    "deepface:cluster_img20": "man",  # Jeff Bezos
    "deepface:cluster_img22": "woman",  # Marissa Mayer
    "deepface:cluster_img24": "man",  # Sundar Pichai
    "deepface:cluster_img26": "woman",  # Katy Perry
    "deepface:cluster_img29": "man",  # Matt Damon
    "deepface:cluster_img34": "man",  # Leonardo DiCaprio
    "deepface:cluster_img38": "man",  # George Clooney
    "face_recognition:alex_lacamoire": "man",
    "face_recognition:biden": "man",
    "face_recognition:kit_harington": "man",
    "face_recognition:lin_manuel_miranda": "man",
    "face_recognition:obama": "man",
    "face_recognition:rose_leslie": "woman",
    "face_reidentification:Chandler": "man",  # Matthew Perry
    "face_reidentification:Joey": "man",  # Matt LeBlanc
    "face_reidentification:Monica": "woman",  # Courteney Cox
    "face_reidentification:Phoebe": "woman",  # Lisa Kudrow
    "face_reidentification:Rachel": "woman",  # Jennifer Aniston
    "face_reidentification:Ross": "man",  # David Schwimmer
    "facenet_pytorch:angelina_jolie": "woman",
    "facenet_pytorch:bradley_cooper": "man",
    "facenet_pytorch:kate_siegel": "woman",
    "facenet_pytorch:paul_rudd": "man",
    "facenet_pytorch:shea_whigham": "man",
    "openface:adams": "woman",  # Amy Adams
    "openface:carell": "man",  # Steve Carell
    "openface:clapton": "man",  # Eric Clapton
    "openface:lennon": "man",  # John Lennon
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-confidence", type=float, help="override attributes.min_gender_confidence")
    parser.add_argument("--details", action="store_true", help="one line per photo on stderr")
    args = parser.parse_args()
    if args.min_confidence is not None:
        os.environ["STREAMER_ATTRIBUTES__MIN_GENDER_CONFIDENCE"] = str(args.min_confidence)

    import sys

    from streamer.config import Settings
    from streamer.engine import FaceEngine, load_image
    from streamer.errors import NoFaceError
    from streamer.infer.attributes import combine_attributes

    media = Path(os.environ.get("STREAMER_MEDIA_DIR", "/work/shared/media"))
    with open(media / "identities.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle)]
    missing = {r["identity"] for r in rows} - PUBLIC_GENDER.keys()
    if missing:
        raise SystemExit(f"no public gender for {sorted(missing)}: add them to PUBLIC_GENDER")
    settings = Settings(attributes={"enabled": ["gender"]})
    right = abstained = no_face = 0
    with FaceEngine(settings) as engine:
        for row in rows:
            image = load_image(media / row["file"])
            try:
                face = engine.primary_face(image, engine.detector.detect(image))
            except NoFaceError:
                no_face += 1
                continue
            head = engine.head("gender")
            (attributes,) = combine_attributes(
                1, gender=head.predict(head.prepare(image, face)),
                min_gender_confidence=settings.attributes.min_gender_confidence)
            gender = attributes.gender
            truth = PUBLIC_GENDER[row["identity"]]
            if gender is None:
                abstained += 1
            elif gender.label == truth:
                right += 1
            if args.details:
                said = "abstain" if gender is None else f"{gender.label} {gender.probability:.2f}"
                print(f"{row['file']:70s} {truth:5s} {said}", file=sys.stderr)
    faces = len(rows) - no_face
    print(json.dumps({
        "photos": len(rows),
        "faces": faces,
        "no_face": no_face,
        "accuracy": round(right / faces, 4),
        "abstained": abstained,
        "accuracy_when_answering": round(right / max(faces - abstained, 1), 4),
    }))


if __name__ == "__main__":
    main()
