# Download / local acquisition of the real datasets (coco, f30k).
