from swirl_vl.training.schedule import SwirlSchedule
from swirl_vl.training.sft import FWMModule, IDMModule
from swirl_vl.training.swirl import SwirlModule

__all__ = ["FWMModule", "IDMModule", "SwirlModule", "SwirlSchedule"]
