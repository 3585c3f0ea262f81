"""The folder ``nnUNet_extTrainer`` names (``maeformer nnunet-trainers`` prints it): nnU-Net imports every
module in it when it looks a trainer up by name, so it holds only trainer modules."""
