"""What goes into image files: reading catalog images, labels (IPTC/XMP), PNG metadata, C2PA
content credentials, placing a product on a canvas, near-duplicates.

May import: catalogen.catalog, storage/, stopping. Never models/, config, the run or above.
"""
