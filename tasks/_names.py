"""First names shared by the generators, chosen to be common and likely single tokens with a leading space."""

MALE = [
    "John", "David", "James", "Michael", "Robert", "William", "Thomas", "Daniel", "Paul", "Mark",
    "George", "Peter", "Kevin", "Brian", "Steven", "Edward", "Richard", "Charles", "Joseph", "Jason",
    "Ryan", "Eric", "Adam", "Jack", "Henry", "Sam", "Matthew", "Andrew", "Scott", "Frank",
    "Tom", "Mike", "Luke", "Simon", "Martin", "Patrick", "Tim", "Harry", "Alex", "Ben",
]  # fmt: skip

FEMALE = [
    "Mary", "Sarah", "Anna", "Emma", "Lisa", "Laura", "Susan", "Karen", "Linda", "Jessica",
    "Emily", "Rachel", "Kate", "Amy", "Alice", "Julia", "Helen", "Rose", "Grace", "Sophie",
    "Jane", "Lucy", "Amanda", "Nancy", "Maria", "Elizabeth", "Ruth", "Anne", "Diana", "Claire",
    "Jennifer", "Michelle", "Nicole", "Rebecca", "Victoria", "Olivia", "Hannah", "Sandra", "Christine", "Megan",
]  # fmt: skip

ALL = MALE + FEMALE
