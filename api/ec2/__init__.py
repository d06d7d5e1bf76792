"""EC2 Query protocol front end: the AWS VM Import/Export API (ImportVolume, ImportInstance, ImportImage,
ImportSnapshot, CreateInstanceExportTask, ExportImage, their Describe/Cancel actions) served so that
boto3, the AWS CLI and euca2ools work against the appliance unmodified.

Modules: :mod:`.model` (botocore's ec2 model), :mod:`.query` (wire parameters → input),
:mod:`.xml` (output → XML), :mod:`.errors`, :mod:`.auth` (SigV4/SigV2), :mod:`.views`
(tasks → EC2 structures), :mod:`.conversion`, :mod:`.image_import` and :mod:`.export` (action handlers) and
:mod:`.resource` (the Falcon resource, :class:`~api.ec2.resource.Ec2Resource`).
"""
