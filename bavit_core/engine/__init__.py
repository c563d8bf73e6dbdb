"""The one training engine both trainers run on (BAViT's ``train``, the detector's
``finetune``): a run directory whose ``state.pt`` is the commit point (:mod:`.rundir`), the
learning-rate schedules (:mod:`.schedule`) and a plain epoch loop each trainer calls with
its model, loss and data (:mod:`.loop`)."""
